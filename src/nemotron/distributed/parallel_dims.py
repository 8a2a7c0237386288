"""Parallel sizes resolved against a world size, validated before anything is built.

`ParallelDims` turns the Megatron-named sizes of `ParallelismConfig` into the sizes of every
mesh dimension (data parallel is derived: world / (TP * CP * PP)) and rejects layouts that
cannot work, showing the arithmetic.

Expert layers see a different split of the same ranks: the ranks of one pipeline stage are
regrouped as (expert data parallel, expert parallel) with EP innermost, so an EP group spans
the tensor-parallel ranks first (as in Megatron with expert tensor parallel size 1):
  dense:  world = PP * DP * CP * TP
  expert: world = PP * EDP * EP,  EDP = DP * CP * TP / EP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nemotron.distributed.config import ParallelismConfig
from nemotron.models.nano3.config import Nano3Config


class ParallelLayoutError(ValueError):
    """A parallel layout that cannot be built for this world size or model."""


# -- the batch and sequence divisibility rules: their one home ----------------------------------
# The config schema checks what it knows (DP = 1, the configured TP and CP), the batch plan the
# data-parallel size, the loader every sample length, `ParallelDims.validate_batch` all of it;
# each calls these functions and names the error type its callers expect.


def sequence_shards(tp: int, cp: int) -> int:
    """Pieces every sequence is cut into: context parallel cuts it into 2*CP chunks (load
    balance), then TP splits each rank's part (sequence parallel)."""
    return tp * (2 * cp if cp > 1 else 1)


def check_global_batch(
    global_batch_size: int, micro_batch_size: int, dp: int = 1, error: type[Exception] = ParallelLayoutError
) -> None:
    """The global batch must split into whole micro-batches on every data-parallel rank."""
    for key, value in (
        ("train.global_batch_size", global_batch_size),
        ("train.micro_batch_size", micro_batch_size),
    ):
        if value < 1:
            raise error(f"{key} must be >= 1, got {value}")
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        by = (
            f"train.micro_batch_size={micro_batch_size}"
            if dp == 1
            else f"train.micro_batch_size * DP = {micro_batch_size}*{dp} = {per_step}"
        )
        raise error(f"train.global_batch_size: {global_batch_size} is not divisible by {by}")


def sample_lengths(seq_length: int, mixed_lengths: Sequence[int] = ()) -> dict[str, int]:
    """Every sample length of a run by the config key that sets it: `train.seq_length` and each
    of `data.mixed_length_blends` (what `check_sequence_lengths` names in its errors)."""
    return {"train.seq_length": seq_length} | {
        f"data.mixed_length_blends[{i}].seq_length": n for i, n in enumerate(mixed_lengths)
    }


def sequence_shards_how(tp: int, cp: int) -> str:
    """`sequence_shards(tp, cp)` spelt out for messages: "TP", or "2*CP*TP = 2*cp*tp"."""
    return f"2*CP*TP = 2*{cp}*{tp}" if cp > 1 else "TP"


def context_halo(model_config: Nano3Config | None) -> int:
    """Tokens every context-parallel chunk of a sequence must hold: the Mamba-2 conv's left
    context (`mamba_conv_kernel` - 1 positions, which each chunk receives from the one before
    it in the sequence); 0 without a Mamba block (or without a model config)."""
    if model_config is None or "mamba" not in model_config.block_kinds:
        return 0
    return model_config.mamba_conv_kernel - 1


def check_sequence_lengths(
    lengths: Mapping[str, int],
    shards: int,
    how: str = "2*CP*TP",
    error: type[Exception] = ParallelLayoutError,
    *,
    cp: int = 1,
    halo: int = 0,
) -> None:
    """Every sample length (`lengths`: config key -> length) must split into `shards` pieces
    (`sequence_shards`; `how` spells out the product for the message, `sequence_shards_how`),
    and under context parallel (`cp` > 1) each of its 2*CP chunks must hold at least `halo`
    tokens (`context_halo`): a shorter chunk cannot hand the next one the conv's context, which
    the Mamba mixer found only in the first step's forward."""
    for key, length in lengths.items():
        if length <= 0 or length % shards:
            raise error(
                f"{key}={length} must be a positive multiple of {shards}: not divisible by "
                f"{how} = {shards} (every sequence is split across those ranks)"
            )
        if cp > 1 and length // (2 * cp) < halo:
            raise error(
                f"{key}={length} is too short for model.context_parallel_size={cp}: its 2*CP = "
                f"{2 * cp} chunks of {length // (2 * cp)} tokens must each hold the Mamba-2 conv's "
                f"left context, model.mamba_conv_kernel-1 = {halo} tokens (sequences of at least "
                f"{2 * cp * halo} tokens, or a smaller model.context_parallel_size)"
            )


def check_pipeline(parallel: ParallelismConfig, model_config: Nano3Config) -> None:
    """Pipeline layouts whose stage split of `model_config` is impossible (schedule, stages per
    rank, manual split), before anything is built. DP, TP + SP, CP and EP all compose with PP,
    and so does `train.compile` (each block compiled: `train.loop.compile_model`)."""
    if parallel.pipeline_model_parallel_size == 1:
        return
    from nemotron.distributed.pipeline_split import PipelineSplitError, split_stages

    try:
        split_stages(model_config, parallel, [(8192, 1.0)])
    except PipelineSplitError as err:
        raise ParallelLayoutError(str(err)) from None


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp: int
    tp: int
    cp: int
    pp: int
    ep: int
    sequence_parallel: bool

    @classmethod
    def from_config(
        cls, parallel: ParallelismConfig, world_size: int, model_config: Nano3Config | None = None
    ) -> "ParallelDims":
        """Derive data parallel from `world_size` and validate. `model_config` (a `Nano3Config`)
        adds the model checks: experts % EP, attention/KV/Mamba heads % TP, ..."""
        tp = parallel.tensor_model_parallel_size
        pp = parallel.pipeline_model_parallel_size
        ep = parallel.expert_model_parallel_size
        cp = parallel.context_parallel_size
        for key, value in [
            ("tensor_model_parallel_size", tp),
            ("pipeline_model_parallel_size", pp),
            ("expert_model_parallel_size", ep),
            ("context_parallel_size", cp),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ParallelLayoutError(f"model.{key} must be an integer >= 1, got {value!r}")
        if world_size < 1:
            raise ParallelLayoutError(f"world size must be >= 1, got {world_size}")
        if model_config is not None:
            check_pipeline(parallel, model_config)
        model_parallel = tp * cp * pp
        if world_size % model_parallel:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by TP*CP*PP = {tp}*{cp}*{pp} = {model_parallel}"
            )
        dp = world_size // model_parallel
        stage_size = dp * cp * tp
        if stage_size % ep:
            raise ParallelLayoutError(
                f"model.expert_model_parallel_size={ep} must divide the ranks of a pipeline stage, "
                f"DP*CP*TP = {dp}*{cp}*{tp} = {stage_size} (world {world_size} / PP {pp})"
            )
        if tp > 1 and not parallel.sequence_parallel:
            raise ParallelLayoutError(
                f"model.tensor_model_parallel_size={tp} needs model.sequence_parallel=true: MoE layers "
                "route each rank's own sequence shard (Megatron requires the same for MoE with TP)"
            )
        dims = cls(
            world_size=world_size,
            dp=dp,
            tp=tp,
            cp=cp,
            pp=pp,
            ep=ep,
            sequence_parallel=bool(parallel.sequence_parallel),
        )
        if model_config is not None:
            dims.validate_model(model_config)
        return dims

    @property
    def edp(self) -> int:
        """Expert data parallel: ranks holding the same experts and seeing different tokens."""
        return self.dp * self.cp * self.tp // self.ep

    def validate_model(self, cfg: Nano3Config) -> None:
        """Reject model/layout combinations that cannot be sharded, showing the arithmetic."""
        kinds = set(cfg.block_kinds)
        checks: list[tuple[str, int, str, int]] = []
        if "moe" in kinds:
            checks.append(("num_experts", cfg.num_experts, "expert_model_parallel_size", self.ep))
        if "attention" in kinds:
            checks.append(
                ("num_attention_heads", cfg.num_attention_heads, "tensor_model_parallel_size", self.tp)
            )
            kv = cfg.num_key_value_heads
            if kv % self.tp and self.tp % kv:
                # fewer KV heads than TP ranks is fine (each rank uses the one its queries need)
                raise ParallelLayoutError(
                    f"model.num_key_value_heads={kv} and model.tensor_model_parallel_size="
                    f"{self.tp} must divide one another ({kv} % {self.tp} = {kv % self.tp}, "
                    f"{self.tp} % {kv} = {self.tp % kv})"
                )
        if "mamba" in kinds:
            checks.append(("mamba_num_heads", cfg.mamba_num_heads, "tensor_model_parallel_size", self.tp))
            checks.append(("mamba_num_groups", cfg.mamba_num_groups, "tensor_model_parallel_size", self.tp))
        if self.tp > 1 and cfg.tie_word_embeddings:
            # the embedding is sharded over the vocabulary and the LM head over its rows by
            # different plans: one tensor cannot be both (checked here, where the layout is
            # known, not when a rank builds its part)
            raise ParallelLayoutError(
                f"model.tie_word_embeddings=true cannot be sharded over model.tensor_model_parallel_size="
                f"{self.tp}: set model.tie_word_embeddings=false or model.tensor_model_parallel_size=1"
            )
        if self.tp > 1:
            checks.append(("vocab_size", cfg.vocab_size, "tensor_model_parallel_size", self.tp))
            if "moe" in kinds and cfg.moe_shared_expert_hidden_size:
                checks.append(
                    (
                        "moe_shared_expert_hidden_size",
                        cfg.moe_shared_expert_hidden_size,
                        "tensor_model_parallel_size",
                        self.tp,
                    )
                )
            if "mlp" in kinds:
                checks.append(("ffn_hidden_size", cfg.ffn_hidden_size, "tensor_model_parallel_size", self.tp))
        for name, value, key, size in checks:
            if value % size:
                raise ParallelLayoutError(
                    f"model.{name}={value} is not divisible by model.{key}={size} "
                    f"({value} % {size} = {value % size})"
                )

    def validate_batch(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        seq_lengths: int | Mapping[str, int],
        model_config: Nano3Config | None = None,
    ) -> None:
        """The global batch must split into whole micro-batches per data-parallel rank, and
        every sequence length (`train.seq_length`, or key -> length) into whole shards per
        context- and tensor-parallel rank; with `model_config`, every context-parallel chunk
        must hold the Mamba conv's context (`context_halo`)."""
        check_global_batch(global_batch_size, micro_batch_size, self.dp)
        if isinstance(seq_lengths, int):
            seq_lengths = {"train.seq_length": seq_lengths}
        check_sequence_lengths(
            seq_lengths,
            self.sequence_shards,
            sequence_shards_how(self.tp, self.cp),
            cp=self.cp,
            halo=context_halo(model_config),
        )

    @property
    def sequence_shards(self) -> int:
        """Pieces every sequence is cut into (sequence lengths must be multiples of it)."""
        return sequence_shards(self.tp, self.cp)

    def gradient_accumulation_steps(self, global_batch_size: int, micro_batch_size: int) -> int:
        self.validate_batch(global_batch_size, micro_batch_size, self.sequence_shards)
        return global_batch_size // (micro_batch_size * self.dp)

    def describe(self) -> str:
        return (
            f"world {self.world_size} = PP {self.pp} x DP {self.dp} x CP {self.cp} x TP "
            f"{self.tp}; experts: EDP {self.edp} x EP {self.ep}"
            + ("; sequence parallel" if self.sequence_parallel else "")
        )
