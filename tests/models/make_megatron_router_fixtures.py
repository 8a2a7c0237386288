"""Regenerate tests/models/fixtures/megatron_router.json: MoE routing, the sequence balance loss
and the expert-bias update computed by Megatron-Core itself.

    pip install --no-deps --target /tmp/mc megatron-core==0.16.1   # CPU is enough
    PYTHONPATH=/tmp/mc:src python tests/models/make_megatron_router_fixtures.py [OUT.json]

Each case runs Megatron's `TopKRouter.routing` (the router of `--moe-router-score-function
sigmoid --moe-router-enable-expert-bias --moe-router-topk-scaling-factor ...
--moe-router-load-balancing-type seq_aux_loss`, float32 router) on given logits and expert bias,
in training mode, one process (every parallel group of size 1), and keeps per tensor:

- `probs` [tokens, E]: the combine weights Megatron scatters over the experts (0 elsewhere) and
  `map` [tokens, E]: the chosen experts;
- `seq_aux_loss`: the sequence balance loss with coefficient 1 (what its tracker logs);
- `grad_aux`: d seq_aux_loss / d logits (a zero upstream gradient on `probs`, so only the loss's
  own gradient, which `MoEAuxLossAutoScaler` injects with scale 1);
- `grad_probs`: d sum(probs * upstream) / d logits, routing weights only (the functional
  `topk_routing_with_score_function`, no aux loss attached);
- `tokens_per_expert`: the router's `local_tokens_per_expert` after the forward, and
  `updated_bias`: `get_updated_expert_bias(tokens_per_expert, expert_bias, rate)`.

Logits are given as ours are laid out, [batch, seq, E] (token t = b * seq + s); Megatron's
router sees them [seq, batch, E], as its MoE layer does. The test
(tests/models/test_megatron_router.py) needs neither Megatron nor this script; it also reruns
these cases against Megatron when megatron-core is importable.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "fixtures" / "megatron_router.json"
RATE = 1e-3  # the recipe's expert-bias update rate


def _cpu_megatron():
    """Megatron-Core's router pieces, made to run on CPU in one gloo process: buffers it puts
    on `torch.cuda.current_device()` go to the CPU, and every parallel group is the world of one
    process (its reductions the identity)."""
    warnings.filterwarnings("ignore")
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    if not torch.distributed.is_initialized():
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    world = torch.distributed.group.WORLD
    moe_utils.parallel_state.get_tensor_and_data_parallel_group = lambda **_: world

    class Groups:
        tp = cp = tp_cp = tp_dp_cp = world

    return moe_utils, TopKRouter, TransformerConfig, Groups


def megatron_case(case: dict) -> dict:
    """Megatron's outputs for one case (the inputs as the fixture stores them)."""
    moe_utils, TopKRouter, TransformerConfig, Groups = _cpu_megatron()
    b, s, e, k = case["batch"], case["seq"], case["experts"], case["top_k"]
    dtype = getattr(torch, case["dtype"])
    logits = torch.tensor(case["logits"], dtype=torch.float32).to(dtype).view(b, s, e)
    bias = torch.tensor(case["bias"], dtype=torch.float32)
    upstream = torch.tensor(case["upstream"], dtype=torch.float32).view(b * s, e)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=1,
        num_moe_experts=e,
        moe_router_topk=k,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=RATE,
        moe_router_topk_scaling_factor=case["scale"],
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1.0,
        moe_router_dtype="fp32",
        add_bias_linear=False,
    )
    router = TopKRouter(config, pg_collection=Groups())
    router.set_layer_number(1)
    router.train()
    with torch.no_grad():
        router.expert_bias.copy_(bias)
    moe_utils.clear_aux_losses_tracker()

    # Megatron's layout: [seq, batch, E]; token rows come back in that order, so map them to ours.
    leaf = logits.transpose(0, 1).contiguous().requires_grad_(True)
    probs, routing_map = router.routing(leaf)
    (probs * 0).sum().backward()  # only the aux loss's own gradient reaches the logits
    order = torch.arange(b * s).view(b, s).t().reshape(-1)  # Megatron row j = our token order[j]
    ours = torch.empty_like(order)
    ours[order] = torch.arange(b * s)
    probs, routing_map = probs.detach()[ours], routing_map[ours]
    grad_aux = leaf.grad.transpose(0, 1).reshape(b * s, e)
    aux = moe_utils.get_moe_layer_wise_logging_tracker()["seq_load_balancing_loss"]["values"][0]

    plain = logits.reshape(b * s, e).clone().requires_grad_(True)
    probs2, _ = moe_utils.topk_routing_with_score_function(
        plain, k, score_function="sigmoid", expert_bias=bias, scaling_factor=case["scale"]
    )
    (probs2.float() * upstream).sum().backward()

    counts = router.local_tokens_per_expert.clone()
    updated = moe_utils.get_updated_expert_bias(counts.clone(), bias.clone(), RATE)
    return {
        "probs": probs.float().tolist(),
        "map": routing_map.int().tolist(),
        "seq_aux_loss": float(aux),
        "grad_aux": grad_aux.float().tolist(),
        "grad_probs": plain.grad.float().tolist(),
        "tokens_per_expert": counts.tolist(),
        "updated_bias": updated.tolist(),
    }


def _inputs(name, *, batch, seq, experts, top_k, scale=2.5, dtype="float32", seed, edit=None):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, experts, generator=gen) * 2
    bias = torch.randn(experts, generator=gen) * 0.05
    upstream = torch.randn(batch * seq, experts, generator=gen)
    if edit is not None:
        edit(logits, bias)
    # bf16 cases store the bf16 values, so both sides start from the same numbers
    logits = logits.to(getattr(torch, dtype)).float()
    return {
        "name": name,
        "batch": batch,
        "seq": seq,
        "experts": experts,
        "top_k": top_k,
        "scale": scale,
        "dtype": dtype,
        "logits": logits.reshape(-1).tolist(),
        "bias": bias.tolist(),
        "upstream": upstream.reshape(-1).tolist(),
    }


def _flip(logits, bias):
    # the bias pushes each token's unbiased favourites out of the top k
    bias.copy_(torch.linspace(-0.6, 0.6, bias.numel()))


def _one_expert(logits, bias):
    # every token's highest score is expert 3; most experts get no token at all
    logits[..., 3] = 12.0
    logits[..., 4:] = -12.0


def _ties(logits, bias):
    # equal scores: experts 1 and 6 tie on every token, one row saturates three scores at 1.0
    # (float32 sigmoid of 40), one row is all-equal
    logits[..., 6] = logits[..., 1]
    logits[0, 1, [0, 2, 5]] = 40.0
    logits[1, 0] = 0.0
    bias.zero_()


CASES = [
    _inputs("recipe width: 128 experts, top 6, scale 2.5", batch=2, seq=3, experts=128, top_k=6, seed=1),
    _inputs("bias flips the top k", batch=2, seq=4, experts=16, top_k=4, seed=2, edit=_flip),
    _inputs(
        "all tokens on one expert, experts with no token",
        batch=2,
        seq=4,
        experts=8,
        top_k=2,
        seed=3,
        edit=_one_expert,
    ),
    _inputs("top k = number of experts", batch=2, seq=3, experts=6, top_k=6, seed=4),
    _inputs("top 1", batch=2, seq=4, experts=8, top_k=1, seed=5),
    _inputs("bf16 logits", batch=2, seq=4, experts=16, top_k=4, dtype="bfloat16", seed=6),
    _inputs("scale 1, one sequence", batch=1, seq=6, experts=8, top_k=3, scale=1.0, seed=7),
    _inputs("ties in the scores", batch=2, seq=3, experts=8, top_k=3, seed=8, edit=_ties),
]


def main() -> None:
    import megatron.core

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT  # another path: the live test's check
    cases = [dict(case, megatron=megatron_case(case)) for case in CASES]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"megatron_core": megatron.core.__version__, "rate": RATE, "cases": cases}) + "\n"
    )
    print(f"wrote {out} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
