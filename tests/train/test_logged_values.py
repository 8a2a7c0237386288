"""Every number a train record holds, against an independent computation, per value and step:
throughput (tokens/s, TFLOP/s per GPU, MFU) from the record's own step time and a FLOP count
written out here from docs/reference.md §6 (not `train.flops`), memory in the unit its key
names, the run average of the summary, and, on 2 gloo ranks, the values of pipeline-parallel
and tied-embedding layouts against one process."""

from __future__ import annotations

import dataclasses
import pickle
import time

import pytest
from distributed._spawn import run_distributed

from nemotron.data.config import SequenceLengthBlend
from nemotron.train import pretrain
from nemotron.train.metrics import read_metrics

from .conftest import TINY_MODEL, make_config

PEAK = 989e12  # dense BF16 H100/H200 datasheet peak, per GPU (docs/reference.md §6)
TIMINGS = ("time", "step_time", "data_time", "tokens_per_second", "tflops", "mfu", "memory_gb")


def forward_flops_per_token(seq: int, m: dict = TINY_MODEL) -> int:
    """docs/reference.md §6 for the tiny model: matmuls only, 2 FLOPs per multiply-add, causal
    attention scores and values, the SSD scan, router + top-k experts + shared expert, LM head."""
    h = m["hidden_size"]
    q = m["num_attention_heads"] * m["head_dim"]
    kv = m["num_key_value_heads"] * m["head_dim"]
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * q * seq
    d_inner = m["mamba_num_heads"] * m["mamba_head_dim"]
    n, g, chunk = m["mamba_state_size"], m["mamba_num_groups"], m["mamba_chunk_size"]
    ssd = 2 * chunk * n * g + 2 * chunk * d_inner + 4 * d_inner * n
    mamba = 2 * h * (2 * d_inner + 2 * g * n + m["mamba_num_heads"]) + 2 * d_inner * h + ssd
    moe = (
        2 * h * m["num_experts"]
        + m["moe_top_k"] * 4 * h * m["moe_ffn_hidden_size"]
        + 4 * h * m["moe_shared_expert_hidden_size"]
    )
    kinds = {"M": mamba, "*": attention, "E": moe}
    return sum(kinds[c] for c in m["hybrid_pattern"]) + 2 * h * m["vocab_size"]


def check_throughput(train: list[dict], tokens_per_step: int, step_flops, world: int) -> None:
    """Each record's tokens/s, TFLOP/s (per GPU) and MFU from its own step time; `step_flops`
    gives a step's model FLOPs (training = 3 x forward) from its token count."""
    tokens = 0
    for record in train:
        step_tokens = record["tokens"] - tokens
        tokens = record["tokens"]
        if tokens_per_step:
            assert step_tokens == tokens_per_step, record["step"]
        seconds = record["step_time"]
        flop = step_flops(step_tokens)
        where = f"step {record['step']}"
        assert record["tokens_per_second"] == pytest.approx(step_tokens / seconds, rel=1e-12), where
        assert record["tflops"] == pytest.approx(flop / seconds / world / 1e12, rel=1e-12), where
        assert record["mfu"] == pytest.approx(flop / seconds / (PEAK * world), rel=1e-12), where


def peak_rss_kib() -> int:
    """The process's peak resident set from /proc (VmHWM, in KiB), not from getrusage."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


def test_throughput_and_memory_of_every_record(tmp_path):
    cfg = make_config(
        tmp_path, checkpoint={"save": None}, data={"mock": True}, train={"train_iters": 3, "eval_iters": 0}
    )
    # a first run grows the process to its working size (imports, allocator pools), so the
    # peak barely moves during the measured one
    pretrain(dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger)), tmp_path / "warm-up")
    before = peak_rss_kib()
    summary = pretrain(cfg, tmp_path / "job")
    after = peak_rss_kib()
    train = [r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    seq = cfg.train.seq_length
    check_throughput(train, 4 * seq, lambda tokens: 3 * tokens * forward_flops_per_token(seq), world=1)
    for record in train:
        # `memory_gb`: decimal GB of the peak resident set (was GiB, 7% less than its name says);
        # the peak only grows, so it lies between the peaks before and after the run (within
        # 1%: the kernel's RSS counters behind getrusage and /proc are synchronised lazily)
        assert 0.99 * before * 1024 / 1e9 <= record["memory_gb"] <= 1.01 * after * 1024 / 1e9
    assert summary.tokens == train[-1]["tokens"] == 3 * 4 * seq


def test_mixed_length_steps_count_each_sample_at_its_own_length(tmp_path):
    cfg = make_config(
        tmp_path,
        checkpoint={"save": None},
        train={"train_iters": 4, "eval_iters": 0, "micro_batch_size": 1, "global_batch_size": 4},
    )
    short = 4
    data = dataclasses.replace(
        cfg.data,
        mock=True,
        blend_weight=1.0,
        mixed_length_blends=[SequenceLengthBlend(blend="", seq_length=short, weight=1.0)],
    )
    cfg = dataclasses.replace(cfg, data=data)
    pretrain(cfg, tmp_path / "job")
    train = [r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    long = cfg.train.seq_length

    def step_flops(tokens: int) -> int:
        longs = (tokens - 4 * short) // (long - short)  # 4 samples, each `long` or `short`
        assert longs * long + (4 - longs) * short == tokens
        return 3 * (
            longs * long * forward_flops_per_token(long)
            + (4 - longs) * short * forward_flops_per_token(short)
        )

    check_throughput(train, 0, step_flops, world=1)
    # each step mixes the lengths (2 + 2 at weights 1:1), where the mean length would hide the
    # long samples' larger attention cost
    assert [r["tokens"] for r in train] == [40, 80, 120, 160]


def test_run_average_is_timed_from_the_first_step(tmp_path, corpus, monkeypatch):
    """The summary's tokens/s is the run's tokens over its wall time from the first step on:
    the corpus statistic computed at the start (a pass over the train split) is set-up."""
    from nemotron.train import trainer

    delay = 0.5

    def slow_entropy(blend, **kwargs):
        time.sleep(delay)
        return 3.0

    monkeypatch.setattr(trainer, "unigram_entropy", slow_entropy)
    cfg = make_config(
        tmp_path, blend=corpus[0], checkpoint={"save": None}, train={"train_iters": 3, "eval_iters": 0}
    )
    start = time.perf_counter()
    summary = pretrain(cfg, tmp_path / "job")
    total = time.perf_counter() - start
    train = [r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    steps = sum(r["step_time"] for r in train)
    assert summary.unigram_entropy == 3.0 and summary.tokens == 3 * 4 * 16
    # wall time of the run: at least its steps, at most what pretrain took without the delay
    assert summary.tokens / (total - delay) <= summary.tokens_per_second <= summary.tokens / steps


# -- two ranks against one process ---------------------------------------------------------------

LAYOUTS = {
    # 2 stages (blocks "ME" and "*E"): each rank holds one MoE layer, rank 0 logs
    "pp2-1f1b": dict(pipeline_model_parallel_size=2, pipeline_schedule="1F1B"),
    # 4 one-block stages in a loop: rank 0 holds blocks 0 and 2 ("M", "*"), no MoE layer at
    # all; rank 1 both MoE layers
    "pp2-interleaved": dict(pipeline_model_parallel_size=2, pipeline_schedule="Interleaved1F1B"),
    # data parallel with the LM head tied to the embeddings (one parameter, counted once in
    # the gradient norm; FSDP2 used to refuse it at the first forward)
    "dp2-tied": dict(tie_word_embeddings=True),
}


def layout_config(root, layout: dict, train: dict | None = None, data: dict | None = None):
    """The tiny run of 3 steps (evaluating at step 2 and at the end) with `layout` (and model
    options) in the model section, `train` and `data` overriding those sections' fields."""
    cfg = make_config(
        root,
        checkpoint={"save": None},
        data={"mock": True, **(data or {})},
        train={"train_iters": 3, "eval_iters": 1, "eval_interval": 2, **(train or {})},
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **layout))


def _run_layouts(rank, world, jobs):
    for cfg_bytes, job_dir in jobs:
        pretrain(pickle.loads(cfg_bytes), job_dir)


def assert_same_records(name: str, ours: list[dict], ref: list[dict]) -> None:
    """Every value of every record but the timings equal: losses and gradient norm within float
    rounding, counts, the learning rate and the expert-load figures exactly."""
    assert [(r["kind"], r["step"]) for r in ours] == [(r["kind"], r["step"]) for r in ref], name
    for mine, theirs in zip(ours, ref):
        where = f"{name} {mine['kind']} step {mine['step']}"
        assert set(mine) == set(theirs), where
        for key, value in theirs.items():
            if key in TIMINGS:
                continue
            if key.startswith("balance/") or key in ("tokens", "phase", "skipped", "skipped_steps", "lr"):
                assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-12), f"{where}: {key}"
            elif isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5), f"{where}: {key}"
            else:
                assert mine[key] == value, f"{where}: {key}"


def test_two_rank_layouts_log_what_one_process_logs(tmp_path):
    """Every value of every record (train, eval, test; timings aside) of PP2 and of DP2 with
    tied embeddings equals the single-process run's: losses and gradient norm within float
    rounding, the per-layer expert-load figures exactly. Under PP rank 0 used to log its own
    stages' MoE layers only (one of two, or none), as the model's worst and mean load."""
    jobs = []
    for name, layout in LAYOUTS.items():
        pretrain(layout_config(tmp_path / name / "single", layout), tmp_path / name / "single" / "job")
        jobs.append((pickle.dumps(layout_config(tmp_path / name, layout)), str(tmp_path / name / "job")))
    run_distributed(_run_layouts, 2, jobs)
    for name in LAYOUTS:
        ours = read_metrics(tmp_path / name / "job")
        assert_same_records(name, ours, read_metrics(tmp_path / name / "single" / "job"))
        train = [r for r in ours if r["kind"] == "train"]
        assert len(train[-1]["balance/per_layer_max_over_mean"]) == 2, name  # both MoE layers
        seq = 16
        check_throughput(train, 4 * seq, lambda tokens: 3 * tokens * forward_flops_per_token(seq), world=2)


TP2 = dict(tensor_model_parallel_size=2, sequence_parallel=True)
# Model options under the 2-rank layouts, a representative few of the sweep of options x
# layouts (docs/parallelism.md "Model options and layouts"): (model section, train, data).
OPTION_LAYOUTS: dict[str, tuple[dict, dict, dict]] = {
    # 1 KV head for 2 TP ranks (k/v replicated, each rank keeps the head its queries read), no
    # shared expert, every block recomputed in backward
    "tp2-kv1-noshared-recompute": (
        dict(TP2, num_key_value_heads=1, moe_shared_expert_hidden_size=0),
        {"activation_recompute": True},
        {},
    ),
    # every token to every expert (top-k = experts), 2 per EP rank
    "ep2-topk-all": (dict(expert_model_parallel_size=2, num_experts=4, moe_top_k=4), {}, {}),
    # EP configured for a model without MoE blocks, ending in a dense MLP
    "ep2-no-moe": (dict(expert_model_parallel_size=2, hybrid_pattern="M*M-", num_layers=4), {}, {}),
    # tied embeddings under CP with mixed-length micro-batches of one sample: the 12-token
    # samples' chunks hold exactly the Mamba conv's 3 positions of context; SSD chunks of 3
    # straddle the CP chunks of 4 of the 16-token samples
    "cp2-tied-short-chunks": (
        dict(context_parallel_size=2, tie_word_embeddings=True, mamba_chunk_size=3),
        {"micro_batch_size": 1},
        {
            "blend_weight": 1.0,
            "mixed_length_blends": [SequenceLengthBlend(blend="", seq_length=12, weight=1.0)],
        },
    ),
    # the V-shaped zero-bubble schedule: rank 0 holds the first and the last block
    "pp2-zbv-noaux": (
        dict(pipeline_model_parallel_size=2, pipeline_schedule="ZBVZeroBubble", moe_seq_aux_loss_coeff=0.0),
        {},
        {},
    ),
}


def test_model_options_under_two_rank_layouts_log_what_one_process_logs(tmp_path):
    """Model options (attention, expert and pattern sizes, tied embeddings, recompute, mixed
    lengths) under TP, EP, CP and PP: every logged value equals one process's."""
    jobs = []
    for name, (layout, train, data) in OPTION_LAYOUTS.items():
        single = layout_config(tmp_path / name / "single", layout, train, data)
        pretrain(single, tmp_path / name / "single" / "job")
        jobs.append(
            (pickle.dumps(layout_config(tmp_path / name, layout, train, data)), str(tmp_path / name / "job"))
        )
    run_distributed(_run_layouts, 2, jobs)
    for name in OPTION_LAYOUTS:
        assert_same_records(
            name, read_metrics(tmp_path / name / "job"), read_metrics(tmp_path / name / "single" / "job")
        )
