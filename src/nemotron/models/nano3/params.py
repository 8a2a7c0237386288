"""Parameter counts of a Nano3 config, from the model itself built on the meta device.

Counting rules (docs/model.md, "Parameter counts"):
- `total`: every parameter (embeddings, LM head, all blocks, norms). Buffers (the expert bias)
  are not parameters and are not counted.
- `active`: parameters that take part in computing one token's output, *excluding* the input
  embedding (a table lookup, not compute): all non-MoE blocks, per MoE block the router, the
  shared expert, the block norm and `top_k` of the routed experts, the final norm, the LM head.
- `active_with_embeddings`: `active` plus the input embedding matrix.
"""

from __future__ import annotations

import torch

from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.models.nano3.moe import MoE


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(config: Nano3Config) -> dict:
    """-> {"total", "active", "active_with_embeddings", "embedding", "lm_head", "final_norm",
    "per_block_kind": {kind: {"layers", "params_per_layer", "active_per_layer"}}}."""
    with torch.device("meta"):
        model = Nano3ForCausalLM(config)

    per_kind: dict[str, dict[str, int]] = {}
    blocks_total = blocks_active = 0
    for layer in model.backbone.layers.values():
        params = _numel(layer)
        active = params
        if isinstance(layer.mixer, MoE):
            routed = _numel(layer.mixer.experts)
            active = params - routed + routed * config.moe_top_k // config.num_experts
        entry = per_kind.setdefault(
            str(layer.kind), {"layers": 0, "params_per_layer": params, "active_per_layer": active}
        )
        entry["layers"] += 1
        blocks_total += params
        blocks_active += active

    # the whole model: every part exists
    assert model.backbone.embeddings is not None and model.backbone.norm_f is not None
    assert model.lm_head is not None
    embedding = model.backbone.embeddings.weight.numel()
    lm_head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    final_norm = _numel(model.backbone.norm_f)
    total = _numel(model)  # parameters() deduplicates a tied embedding
    active = blocks_active + final_norm + model.lm_head.weight.numel()
    return {
        "total": total,
        "active": active,
        "active_with_embeddings": active + (embedding if not config.tie_word_embeddings else 0),
        "embedding": embedding,
        "lm_head": lm_head,
        "final_norm": final_norm,
        "per_block_kind": per_kind,
    }
