"""Nemotron 3 Nano: a stack of pre-norm residual blocks (Mamba-2, attention, MoE, dense MLP)
chosen by the hybrid pattern, an untied LM head, and the training loss.

Single-device and readable; sharding is applied from outside (`nemotron.distributed`),
through the extension points listed in `nemotron.models.nano3.parallel`. Build on the meta
device and materialise with `to_empty(...)` + `reset_parameters()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy, token_weights
from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.mamba2 import Mamba2Mixer
from nemotron.models.nano3.mlp import MLP
from nemotron.models.nano3.moe import MoE
from nemotron.models.nano3.norm import RMSNorm, upcast
from nemotron.models.nano3.parallel import VocabParallelOps


@dataclass
class Nano3Output:
    loss: torch.Tensor | None  # lm_loss (+ aux coefficient * aux_loss when training)
    lm_loss: torch.Tensor | None  # mean token cross-entropy over loss_mask
    aux_loss: torch.Tensor | None  # sum over MoE layers of the sequence balance loss (no coefficient)
    logits: torch.Tensor | None  # [batch, seq, vocab]; None when a chunked loss path skips them


def cross_entropy(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                  loss_mask: torch.Tensor | None, fused: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LM head + mean token cross-entropy: returns (loss, logits or None).

    Labels equal to -100 are ignored; `loss_mask` (0/1 or weights) weights the tokens; the mean
    is over the weights' sum (at least 1). `fused`: the chunked LM-head loss of
    `nemotron.kernels.cross_entropy`, which never holds the full float32 [tokens x vocab] logits
    and returns no logits; otherwise the LM head module is called and the logits are returned.
    """
    if fused:
        loss = linear_cross_entropy(
            hidden.flatten(0, -2), lm_head.weight, labels.reshape(-1),
            None if loss_mask is None else loss_mask.reshape(-1),
        )
        return loss, None
    logits = lm_head(hidden)
    flat_labels = labels.reshape(-1)
    token_loss = F.cross_entropy(upcast(logits.flatten(0, -2)), flat_labels, ignore_index=IGNORE_INDEX,
                                 reduction="none")
    weights = token_weights(flat_labels, None if loss_mask is None else loss_mask.reshape(-1),
                            token_loss.dtype)
    return (token_loss * weights).sum() / weights.sum().clamp(min=1.0), logits


def build_mixer(config: Nano3Config, kind: str) -> nn.Module:
    if kind == "mamba":
        return Mamba2Mixer(config)
    if kind == "attention":
        return Attention(config)
    if kind == "moe":
        return MoE(config)
    if kind == "mlp":
        return MLP(config.hidden_size, config.ffn_hidden_size, config.init_std, config.output_init_std)
    raise ValueError(f"unknown block kind {kind!r}")


class Block(nn.Module):
    """`x + mixer(norm(x))`. Returns (x, aux_loss) where aux_loss is None except for MoE."""

    def __init__(self, config: Nano3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.block_kinds[layer_idx]
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = build_mixer(config, self.kind)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.mixer(self.norm(x))
        aux = None
        if isinstance(out, tuple):
            out, aux = out
        return x + out, aux


class Nano3Model(nn.Module):
    """The backbone: embeddings, blocks, final norm."""

    def __init__(self, config: Nano3Config) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.norm_eps)
        nn.init.normal_(self.embeddings.weight, std=config.init_std)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids [batch, seq] -> (hidden [batch, seq, hidden], summed MoE aux loss or None)."""
        x = self.embeddings(input_ids)
        aux_total = None
        for layer in self.layers:
            x, aux = layer(x)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm_f(x), aux_total


class Nano3ForCausalLM(nn.Module):
    """`fused_loss`: with labels, compute the loss with the chunked LM-head loss and return no
    logits (the memory-light training path); set False to get logits alongside the loss."""

    def __init__(self, config: Nano3Config, fused_loss: bool = True) -> None:
        super().__init__()
        self.config = config
        self.fused_loss = fused_loss
        self.backbone = Nano3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)
        # Extension points (models/nano3/parallel.py), set by a parallel layout: the LM head's
        # output sharded over the vocabulary (tensor parallel), and how to initialise sharded
        # parameters to exactly the single-device weights (`reset_parameters` calls it).
        self.vocab_parallel: VocabParallelOps | None = None
        self.parallel_init: Callable[[nn.Module], None] | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter and buffer per the Megatron recipe (docs/model.md).
        Sharded by a parallel layout: its `parallel_init`, which gives every rank its shards of
        the weights this method gives one device under the same seed."""
        if self.parallel_init is not None:
            self.parallel_init(self)
            return
        nn.init.normal_(self.backbone.embeddings.weight, std=self.config.init_std)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight  # to_empty() unties them
        else:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        for module in self.backbone.modules():
            # Plain Linear / Conv1d / Embedding layers are initialised by the module that owns them.
            reset = getattr(module, "reset_parameters", None)
            if reset is not None and not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                reset()

    def moe_layers(self) -> list[MoE]:
        return [layer.mixer for layer in self.backbone.layers if isinstance(layer.mixer, MoE)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> Nano3Output:
        hidden, aux_loss = self.backbone(input_ids)
        vocab_parallel = self.vocab_parallel
        if labels is None:
            logits = (self.lm_head(hidden) if vocab_parallel is None
                      else vocab_parallel.logits(hidden, self.lm_head))
            return Nano3Output(loss=None, lm_loss=None, aux_loss=aux_loss, logits=logits)
        if vocab_parallel is None:
            lm_loss, logits = cross_entropy(hidden, self.lm_head, labels, loss_mask, self.fused_loss)
        else:
            lm_loss, logits = vocab_parallel.loss(hidden, self.lm_head, labels, loss_mask), None
        loss = lm_loss
        if self.training and aux_loss is not None and self.config.moe_seq_aux_loss_coeff > 0:
            loss = lm_loss + self.config.moe_seq_aux_loss_coeff * aux_loss
        return Nano3Output(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits)
