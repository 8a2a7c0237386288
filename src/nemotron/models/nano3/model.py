"""Nemotron 3 Nano: a stack of pre-norm residual blocks (Mamba-2, attention, MoE, dense MLP)
chosen by the hybrid pattern, an untied LM head, and the training loss.

Single-device and readable; sharding is applied from outside (`nemotron.distributed`),
through the extension points listed in `nemotron.models.nano3.parallel`. Build on the meta
device and materialise with `to_empty(...)` + `reset_parameters()`.

Pipeline parts: `Nano3ForCausalLM(config, blocks=range(a, b))` builds only blocks [a, b) of
the stack, the embeddings only if a == 0, the final norm and LM head only if b == num_layers
(one pipeline stage's part; parameter names are those of the whole model, so checkpoints are
the same whatever the split). A part takes what the part before it returned and speaks in
tensors only, as `torch.distributed.pipelining` sends them between ranks:
  forward(inputs, aux_loss, labels=None, loss_mask=None, padding_mask=None)
    inputs:   token ids [batch, seq] for the first part, hidden states [batch, seq, hidden] after
              (under sequence parallel, this rank's shard [batch, seq/TP, hidden])
    aux_loss: sum of the MoE balance losses of the blocks before this part (scalar)
  -> (hidden, aux_loss) for the next part, or (lm_loss, aux_loss) from the last part.
The sum of the balance losses travels with the hidden states, so the last part holds the
whole model's value and its gradient reaches every MoE layer through the pipeline's backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.kernels.cross_entropy import IGNORE_INDEX, WGRAD_GROUP_ROWS, linear_cross_entropy, token_weights
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


def cross_entropy(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    fused: bool,
    fp8: bool = False,
    fp8_group_rows: int = WGRAD_GROUP_ROWS,
    fp8_fast_accum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LM head + mean token cross-entropy: returns (loss, logits or None).

    Labels equal to -100 are ignored; `loss_mask` (0/1 or weights) weights the tokens; the mean
    is over the weights' sum (at least 1). `fused`: the chunked LM-head loss of
    `nemotron.kernels.cross_entropy`, which never holds the full float32 [tokens x vocab] logits
    and returns no logits; otherwise the LM head module is called and the logits are returned.
    `fp8` (fused only): the chunked loss's FP8 products (`linear_cross_entropy(fp8=True)`, its
    scale groups of `fp8_group_rows` rows, `fp8_fast_accum` its products' accumulation).
    """
    if fused:
        loss = linear_cross_entropy(
            hidden.flatten(0, -2),
            lm_head.weight,
            labels.reshape(-1),
            None if loss_mask is None else loss_mask.reshape(-1),
            fp8=fp8,
            fp8_group_rows=fp8_group_rows,
            fp8_fast_accum=fp8_fast_accum,
        )
        return loss, None
    logits = lm_head(hidden)
    flat_labels = labels.reshape(-1)
    token_loss = F.cross_entropy(
        upcast(logits.flatten(0, -2)), flat_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    weights = token_weights(
        flat_labels, None if loss_mask is None else loss_mask.reshape(-1), token_loss.dtype
    )
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

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Only the MoE's statistics tell padding from tokens; every other mixer is causal or
        # per token, so padding at the end of a sequence changes nothing before it.
        if isinstance(self.mixer, MoE):
            out = self.mixer(self.norm(x), padding_mask)
        else:
            out = self.mixer(self.norm(x))
        aux = None
        if isinstance(out, tuple):
            out, aux = out
        return x + out, aux


def check_blocks(config: Nano3Config, blocks: range) -> range:
    """`blocks` is a non-empty, contiguous range of the model's block indices."""
    if blocks.step != 1 or len(blocks) == 0 or blocks.start < 0 or blocks.stop > config.num_layers:
        raise ValueError(
            f"blocks {blocks} is not a non-empty contiguous range of the {config.num_layers} blocks"
        )
    if config.tie_word_embeddings and len(blocks) != config.num_layers:
        raise ValueError(
            "tied word embeddings cannot be split over pipeline parts (the "
            "embedding and the LM head would live on different stages)"
        )
    return blocks


class Nano3Model(nn.Module):
    """The backbone: embeddings, blocks, final norm (of a pipeline part: the blocks in
    `blocks`, the embeddings if it starts the stack, the final norm if it ends it).

    `layers` is keyed by the block's index in the whole model ("0", "1", ...), so parameter
    names do not depend on the part."""

    def __init__(self, config: Nano3Config, blocks: range | None = None) -> None:
        super().__init__()
        self.config = config
        blocks = check_blocks(config, range(config.num_layers) if blocks is None else blocks)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size) if blocks.start == 0 else None
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in blocks})
        self.norm_f = (
            RMSNorm(config.hidden_size, eps=config.norm_eps) if blocks.stop == config.num_layers else None
        )
        if self.embeddings is not None:
            nn.init.normal_(self.embeddings.weight, std=config.init_std)

    def forward(
        self,
        inputs: torch.Tensor,
        aux_loss: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs: token ids [batch, seq] (with embeddings) or hidden states [batch, seq, hidden];
        `aux_loss`: balance losses of earlier blocks; `padding_mask` [batch, seq]: True at the
        padding of a mixed-length micro-batch (kept out of the MoE balancing statistics).
        -> (hidden [batch, seq, hidden] (after the final norm if this ends the stack), MoE aux
        losses summed, or None)."""
        x = self.embeddings(inputs) if self.embeddings is not None else inputs
        aux_total = aux_loss
        for layer in self.layers.values():
            x, aux = layer(x, padding_mask) if padding_mask is not None else layer(x)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if self.norm_f is not None:
            x = self.norm_f(x)
        return x, aux_total


class Nano3ForCausalLM(nn.Module):
    """`fused_loss`: with labels, compute the loss with the chunked LM-head loss and return no
    logits (the memory-light training path); set False to get logits alongside the loss.
    `blocks`: build only this pipeline part of the model (module docstring); None: the whole
    model, whose forward returns a `Nano3Output`."""

    def __init__(self, config: Nano3Config, fused_loss: bool = True, blocks: range | None = None) -> None:
        super().__init__()
        self.config = config
        self.fused_loss = fused_loss
        self.blocks = check_blocks(config, range(config.num_layers) if blocks is None else blocks)
        self.backbone = Nano3Model(config, self.blocks)
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if self.blocks.stop == config.num_layers
            else None
        )
        if config.tie_word_embeddings:  # the whole model (check_blocks)
            assert self.lm_head is not None and self.backbone.embeddings is not None
            self.lm_head.weight = self.backbone.embeddings.weight
        elif self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)
        # Extension points (models/nano3/parallel.py), set by a parallel layout: the LM head's
        # output sharded over the vocabulary (tensor parallel), and how to initialise sharded
        # parameters to exactly the single-device weights (`reset_parameters` calls it).
        self.vocab_parallel: VocabParallelOps | None = None
        self.parallel_init: Callable[[nn.Module], None] | None = None
        # The chunked LM-head loss's products in FP8, their scale groups' rows and accumulation
        # (`train.fp8` with `lm_head` among its layers sets them; the weights stay what they are).
        self.fp8_lm_head = False
        self.fp8_lm_head_group_rows = WGRAD_GROUP_ROWS
        self.fp8_lm_head_fast_accum = False

    @property
    def is_pipeline_part(self) -> bool:
        """True when this holds only part of the blocks (and speaks the pipeline's tensors)."""
        return len(self.blocks) != self.config.num_layers

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter and buffer per the Megatron recipe (docs/model.md).
        Sharded by a parallel layout: its `parallel_init`, which gives every rank its shards of
        the weights this method gives one device under the same seed (a pipeline part gets the
        weights of the whole model's init only that way: it draws the whole model's order)."""
        if self.parallel_init is not None:
            self.parallel_init(self)
            return
        if self.backbone.embeddings is not None:
            nn.init.normal_(self.backbone.embeddings.weight, std=self.config.init_std)
        if self.config.tie_word_embeddings:
            assert self.lm_head is not None and self.backbone.embeddings is not None
            self.lm_head.weight = self.backbone.embeddings.weight  # to_empty() unties them
        elif self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        for module in self.backbone.modules():
            # Plain Linear / Conv1d / Embedding layers are initialised by the module that owns them.
            reset = getattr(module, "reset_parameters", None)
            if reset is not None and not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                reset()

    def moe_layers(self) -> list[MoE]:
        return [layer.mixer for layer in self.backbone.layers.values() if isinstance(layer.mixer, MoE)]

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_loss: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> Nano3Output | tuple[torch.Tensor, torch.Tensor]:
        """The whole model: token ids -> `Nano3Output`. A pipeline part: see the module
        docstring (`input_ids` then holds hidden states on every part but the first).
        `padding_mask` [batch, seq], True at the padding of a mixed-length micro-batch: not
        counted by the MoE balancing (expert counts, balance loss); the LM loss is the
        `loss_mask`'s."""
        received = aux_loss
        hidden, aux_loss = self.backbone(input_ids, aux_loss, padding_mask)
        if self.is_pipeline_part:
            if aux_loss is received and aux_loss is not None:
                # A part without MoE blocks hands its input on; under FSDP2 that input is a
                # view (its pre-forward hook's), and FSDP2 warns at every forward about a
                # module returning a view. A fresh 0-d tensor: same value and gradient.
                aux_loss = aux_loss.clone()
            return self._pipeline_outputs(hidden, aux_loss, labels, loss_mask)
        assert self.lm_head is not None  # the whole model has one
        vocab_parallel = self.vocab_parallel
        if labels is None:
            logits = (
                self.lm_head(hidden)
                if vocab_parallel is None
                else vocab_parallel.logits(hidden, self.lm_head)
            )
            return Nano3Output(loss=None, lm_loss=None, aux_loss=aux_loss, logits=logits)
        lm_loss, logits = self._lm_loss(hidden, labels, loss_mask)
        loss = lm_loss
        if self.training and aux_loss is not None and self.config.moe_seq_aux_loss_coeff > 0:
            loss = lm_loss + self.config.moe_seq_aux_loss_coeff * aux_loss
        return Nano3Output(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits)

    def _pipeline_outputs(
        self,
        hidden: torch.Tensor,
        aux_loss: torch.Tensor | None,
        labels: torch.Tensor | None,
        loss_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a pipeline part hands on: tensors only, the balance-loss sum always present."""
        if aux_loss is None:  # no MoE block so far
            aux_loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if self.lm_head is None:
            return hidden, aux_loss
        if labels is None:
            raise ValueError("the last pipeline part needs labels (it returns the loss)")
        lm_loss, _ = self._lm_loss(hidden, labels, loss_mask)  # the same loss path as the whole model
        return lm_loss, aux_loss

    def _lm_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(LM-head loss, logits or None) with this model's loss settings: vocabulary-parallel
        under tensor parallelism, else `cross_entropy` (chunked and FP8 as set)."""
        assert self.lm_head is not None
        if self.vocab_parallel is not None:
            return self.vocab_parallel.loss(hidden, self.lm_head, labels, loss_mask), None
        return cross_entropy(
            hidden,
            self.lm_head,
            labels,
            loss_mask,
            self.fused_loss,
            self.fp8_lm_head,
            self.fp8_lm_head_group_rows,
            self.fp8_lm_head_fast_accum,
        )
