import pytest

from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.parallel_dims import ParallelDims, ParallelLayoutError
from nemotron.models.nano3.config import Nano3Config


def cfg(**kw):
    return ParallelismConfig(**kw)


def test_dp_is_derived_and_expert_view():
    dims = ParallelDims.from_config(
        cfg(tensor_model_parallel_size=8, expert_model_parallel_size=8, sequence_parallel=True),
        world_size=64,
        model_config=Nano3Config(),
    )
    assert (dims.dp, dims.tp, dims.ep, dims.edp) == (8, 8, 8, 8)
    assert "DP 8" in dims.describe()


@pytest.mark.parametrize(
    "kw, world, needle",
    [
        (dict(tensor_model_parallel_size=3, sequence_parallel=True), 8, "TP*CP*PP = 3*1*1 = 3"),
        (dict(expert_model_parallel_size=3), 6, None),  # 6 % 3 ok: experts checked below
        (dict(expert_model_parallel_size=4), 6, "DP*CP*TP = 6*1*1 = 6"),
        (dict(pipeline_model_parallel_size=3), 4, "TP*CP*PP = 1*1*3 = 3"),
        (dict(pipeline_model_parallel_size=2, expert_model_parallel_size=4), 4, "DP*CP*TP = 2*1*1 = 2"),
        (dict(context_parallel_size=3), 4, "TP*CP*PP = 1*3*1 = 3"),
        (
            dict(tensor_model_parallel_size=2),
            4,
            "^model.tensor_model_parallel_size=2 needs model.sequence_parallel",
        ),
        (dict(tensor_model_parallel_size=0), 4, ">= 1"),
    ],
)
def test_impossible_layouts_are_rejected_with_arithmetic(kw, world, needle):
    if needle is None:
        assert ParallelDims.from_config(cfg(**kw), world).edp == 2
        return
    with pytest.raises(ParallelLayoutError, match=needle.replace("*", r"\*")):
        ParallelDims.from_config(cfg(**kw), world)


def test_long_context_layout_with_pipeline_and_tensor_parallel():
    """The long-context recipe's layout, TP8 CP8 EP8 PP4 (+ SP), resolves at its world size
    (256 ranks: one replica) with the whole model's checks and the recipe's batch (48 samples of
    512K tokens mixed with 4K ones); PP with TP needs whole replicas like any other layout."""
    lc = cfg(
        tensor_model_parallel_size=8,
        context_parallel_size=8,
        expert_model_parallel_size=8,
        pipeline_model_parallel_size=4,
        sequence_parallel=True,
    )
    dims = ParallelDims.from_config(lc, 256, Nano3Config())
    assert (dims.pp, dims.dp, dims.cp, dims.tp, dims.ep, dims.edp) == (4, 1, 8, 8, 8, 8)
    dims.validate_batch(48, 1, {"train.seq_length": 524288, "data.mixed_length_blends[0].seq_length": 4096})
    assert ParallelDims.from_config(lc, 512, Nano3Config()).dp == 2
    with pytest.raises(ParallelLayoutError, match=r"TP\*CP\*PP = 8\*8\*4 = 256"):
        ParallelDims.from_config(lc, 128, Nano3Config())
    pp_tp = cfg(pipeline_model_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True)
    assert ParallelDims.from_config(pp_tp, 4).describe().startswith("world 4 = PP 2 x DP 1 x CP 1 x TP 2")


def test_model_divisibility():
    nano = Nano3Config()
    with pytest.raises(
        ParallelLayoutError,
        match=r"num_experts=128 is not divisible by "
        r"model.expert_model_parallel_size=3 \(128 % 3 = 2\)",
    ):
        ParallelDims.from_config(cfg(expert_model_parallel_size=3), 3, nano)
    with pytest.raises(ParallelLayoutError, match=r"num_key_value_heads=2 .*3 % 2 = 1"):
        ParallelDims.from_config(
            cfg(tensor_model_parallel_size=3, sequence_parallel=True),
            3,
            Nano3Config(num_attention_heads=6, mamba_num_heads=48, mamba_num_groups=3, vocab_size=131073),
        )
    with pytest.raises(ParallelLayoutError, match=r"mamba_num_groups=8 .* % 16 = 8"):
        ParallelDims.from_config(cfg(tensor_model_parallel_size=16, sequence_parallel=True), 16, nano)
    ParallelDims.from_config(cfg(tensor_model_parallel_size=2, sequence_parallel=True), 2, nano)


def test_batch_validation():
    dims = ParallelDims.from_config(cfg(tensor_model_parallel_size=2, sequence_parallel=True), 8)
    assert dims.gradient_accumulation_steps(global_batch_size=16, micro_batch_size=2) == 2
    with pytest.raises(ParallelLayoutError, match=r"micro_batch_size \* DP = 3\*4 = 12"):
        dims.validate_batch(16, 3, 64)
    with pytest.raises(ParallelLayoutError, match="seq_length=63"):
        dims.validate_batch(16, 1, 63)


def test_context_parallel_layout_and_sequence_split():
    dims = ParallelDims.from_config(
        cfg(
            tensor_model_parallel_size=2,
            context_parallel_size=2,
            expert_model_parallel_size=4,
            sequence_parallel=True,
        ),
        world_size=8,
        model_config=Nano3Config(),
    )
    assert (dims.dp, dims.cp, dims.tp, dims.edp) == (2, 2, 2, 2)
    assert dims.sequence_shards == 8  # 2*CP load-balanced chunks, each split over TP
    dims.validate_batch(4, 1, 8192)
    with pytest.raises(ParallelLayoutError, match=r"not divisible by 2\*CP\*TP = 2\*2\*2 = 8"):
        dims.validate_batch(4, 1, 4100)


@pytest.mark.parametrize(
    "local,tp,cp,message",
    [
        (8, 2, 1, None),
        (7, 2, 1, r"sequence length=7 must be a positive multiple of 2: not divisible by TP "),
        (8, 2, 2, None),  # 16 tokens: 4 chunks of 4, each split over TP2
        (6, 2, 2, r"\(CP 2 x 6 tokens per rank\)=12 must be a positive multiple of 8: .*2\*CP\*TP = 2\*2\*2"),
        (6, 1, 2, None),
    ],
)
def test_local_sequence_check(local, tp, cp, message):
    """What a rank's model (and every pipeline rank, before a schedule's first exchange)
    checks of the length it holds: the rule of `validate_batch`, on the local length."""
    from nemotron.distributed.apply import check_local_sequence

    if message is None:
        check_local_sequence(local, tp, cp)
    else:
        with pytest.raises(ParallelLayoutError, match=message):
            check_local_sequence(local, tp, cp)


@pytest.mark.parametrize(
    "local,tp,cp,halo,message",
    [
        (6, 1, 2, 3, None),  # 12 tokens: 4 chunks of 3, each the conv's 3 positions of context
        (4, 1, 2, 3, r"\(CP 2 x 4 tokens per rank\)=8 is too short for model.context_parallel_size=2: "),
        (
            4,
            2,
            2,
            3,
            r"chunks of 2 tokens .* model.mamba_conv_kernel-1 = 3 tokens \(sequences of at least 12",
        ),
        (4, 1, 2, 0, None),  # no Mamba block: no context to hand on
        (2, 1, 1, 3, None),  # no context parallel: the conv pads the start of the sequence
    ],
)
def test_local_sequence_check_of_context_chunks(local, tp, cp, halo, message):
    """A context-parallel chunk shorter than the Mamba conv's context is refused by the check
    every rank runs before its first collective; it used to fail inside the first Mamba mixer's
    forward (a traceback at the first step; a pipeline's earlier stages then waited on it)."""
    from nemotron.distributed.apply import check_local_sequence

    if message is None:
        check_local_sequence(local, tp, cp, halo)
    else:
        with pytest.raises(ParallelLayoutError, match=message):
            check_local_sequence(local, tp, cp, halo)


def test_batch_validation_of_context_chunks_against_the_model():
    """`validate_batch` with the model config: every sample length's 2*CP chunks hold the Mamba
    conv's context (kernel - 1 tokens); a pattern without Mamba blocks has no such minimum."""
    dims = ParallelDims.from_config(cfg(context_parallel_size=2), 2)
    lengths = {"train.seq_length": 16, "data.mixed_length_blends[0].seq_length": 8}
    dims.validate_batch(4, 1, lengths)  # no model: the divisibility rule only
    nano = Nano3Config()  # mamba_conv_kernel 4: chunks of at least 3 tokens, samples of 12
    with pytest.raises(
        ParallelLayoutError,
        match=r"^data.mixed_length_blends\[0\].seq_length=8 is too short for model.context_parallel_size=2: "
        r"its 2\*CP = 4 chunks of 2 tokens must each hold the Mamba-2 conv's left context, "
        r"model.mamba_conv_kernel-1 = 3 tokens \(sequences of at least 12 tokens",
    ):
        dims.validate_batch(4, 1, lengths, nano)
    dims.validate_batch(4, 1, {"train.seq_length": 12}, nano)
    dims.validate_batch(4, 1, lengths, Nano3Config(hybrid_pattern="*E", num_layers=2))
    dims.validate_batch(4, 1, lengths, Nano3Config(mamba_conv_kernel=3))  # chunks of 2 suffice


def test_tied_embeddings_with_tensor_parallel_are_a_layout_error():
    """Tied embeddings cannot be sharded by TP (the embedding by vocabulary, the LM head by its
    rows): refused where the layout is known, naming both keys, instead of a NotImplementedError
    on every rank when it builds its part; one process (TP 1) trains them."""
    tied = Nano3Config(tie_word_embeddings=True)
    with pytest.raises(
        ParallelLayoutError, match=r"model.tie_word_embeddings=true .*tensor_model_parallel_size=2"
    ):
        ParallelDims.from_config(cfg(tensor_model_parallel_size=2, sequence_parallel=True), 2, tied)
    assert ParallelDims.from_config(cfg(), 2, tied).dp == 2
