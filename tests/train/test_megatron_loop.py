"""The training loop's bookkeeping against Megatron-LM's (megatron/training/training.py):
which validation samples each evaluation reads (a final pass after the loop, as `pretrain`
does after `train`), and how a skipped (non-finite) step moves the learning-rate schedule
(`opt_param_scheduler.step` only when `update_successful`). The expectations are written out
from Megatron's rules, not taken from the loader or the schedule under test."""

from __future__ import annotations

import json
import os
import signal

import torch

from nemotron.data.gpt_dataset import build_split_dataset
from nemotron.distributed.utils import loss_tokens
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train import pretrain
from nemotron.train.checkpoint import load_checkpoint
from nemotron.train.config import OptimizerConfig, SchedulerConfig
from nemotron.train.metrics import METRICS_FILE
from nemotron.train.schedule import learning_rate
from nemotron.train.trainer import RunState

from .conftest import make_config
from .test_loop import _nan_after


def raw_records(job_dir, kind):
    """(step, record) of every `kind` line of metrics.jsonl, duplicates kept, in file order."""
    lines = (job_dir / METRICS_FILE).read_text().splitlines()
    return [(r["step"], r) for r in map(json.loads, lines) if r["kind"] == kind]


def valid_loss_of(cfg, checkpoint, samples):
    """LM loss (mean over loss tokens) of the weights of `checkpoint` on valid samples
    `samples`, read from a valid split of Megatron's size, (train_iters // eval_interval + 1) x
    eval_iters x global_batch_size samples, in micro-batches of micro_batch_size."""
    train = cfg.train
    size = (train.train_iters // train.eval_interval + 1) * train.eval_iters * train.global_batch_size
    dataset = build_split_dataset(
        cfg.data.blend,
        "valid",
        size,
        train.seq_length,
        train.seed,
        cfg.data.cache_dir,
        vocab_size=cfg.model.vocab_size,
    )
    model = Nano3ForCausalLM(cfg.model.arch(), fused_loss=train.fused_kernels)
    load_checkpoint(checkpoint, model, None, restore_rng=False)
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for first in range(samples.start, samples.stop, train.micro_batch_size):
            items = [dataset[i] for i in range(first, first + train.micro_batch_size)]
            batch = {k: torch.stack([s[k] for s in items]) for k in items[0]}
            out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
            tokens = float(loss_tokens(batch["labels"], batch["loss_mask"]))
            total += float(out.lm_loss.double()) * tokens
            count += tokens
    return total / count


def test_a_final_validation_pass_follows_the_loop_and_resumes_exactly(tmp_path, corpus):
    """8 steps, eval_interval 4, eval_iters 1, global batch 4: Megatron evaluates at 4 (valid
    samples 0-3) and 8 (4-7) in the loop, then once more after it (8-11, the valid iterator
    going on; the split holds (8 // 4 + 1) x 4 = 12 samples for it), then tests. A run stopped
    by a signal has neither final pass; resumed, it evaluates what the uninterrupted run did;
    a completed run run again repeats its final pass on the same samples."""
    ref = make_config(tmp_path / "ref", blend=corpus[0], checkpoint={"save_interval": 4})
    summary = pretrain(ref, tmp_path / "ref" / "job")
    evals = raw_records(tmp_path / "ref" / "job", "eval")
    assert [step for step, _ in evals] == [4, 8, 8]
    assert [step for step, _ in raw_records(tmp_path / "ref" / "job", "test")] == [8]
    saved = tmp_path / "ref" / "ckpt"
    expected = [
        valid_loss_of(ref, saved / "iter_0000004", range(0, 4)),
        valid_loss_of(ref, saved / "iter_0000008", range(4, 8)),
        valid_loss_of(ref, saved / "iter_0000008", range(8, 12)),
    ]
    wrong_window = valid_loss_of(ref, saved / "iter_0000008", range(0, 4))
    assert len({*expected, wrong_window}) == 4  # the windows are told apart
    for (_, record), loss in zip(evals, expected, strict=True):
        assert abs(record["loss"] - loss) <= 1e-9 * abs(loss)
    assert summary.valid_loss == evals[-1][1]["loss"]

    cfg = make_config(tmp_path, blend=corpus[0])

    def preempt(kind, payload):
        if kind == "train" and payload["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    first = pretrain(cfg, tmp_path / "job", on_event=preempt)
    assert first.status == "interrupted" and first.valid_loss == evals[0][1]["loss"]
    assert [step for step, _ in raw_records(tmp_path / "job", "eval")] == [4]  # no pass at 5
    assert raw_records(tmp_path / "job", "test") == []
    pretrain(cfg, tmp_path / "job")
    pretrain(cfg, tmp_path / "job")  # complete already: its final passes again
    got = [(step, r["loss"]) for step, r in raw_records(tmp_path / "job", "eval")]
    want = [(step, r["loss"]) for step, r in evals]
    assert got == want + want[-1:]
    tests = [r["loss"] for _, r in raw_records(tmp_path / "job", "test")]
    assert tests == [raw_records(tmp_path / "ref" / "job", "test")[0][1]["loss"]] * 2


def test_a_run_that_evaluated_nothing_resumes_valid_where_megatron_does(tmp_path, corpus):
    """Stopped at step 5 with train.eval_iters=0, resumed with eval_iters=1: Megatron's loader
    finds consumed_valid_samples 0 past step 0 and starts valid at (5 // 4) x 1 x 4 = 4, where
    a run that had evaluated all along stands: its passes at step 8 read samples 4-7 and 8-11,
    as the uninterrupted run's do (not 0-3 and 4-7)."""
    ref = make_config(tmp_path / "ref", blend=corpus[0])
    pretrain(ref, tmp_path / "ref" / "job")
    want = [(step, r["loss"]) for step, r in raw_records(tmp_path / "ref" / "job", "eval")][1:]

    def preempt(kind, payload):
        if kind == "train" and payload["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    quiet = make_config(tmp_path, blend=corpus[0], train={"eval_iters": 0})
    assert pretrain(quiet, tmp_path / "job", on_event=preempt).status == "interrupted"
    pretrain(make_config(tmp_path, blend=corpus[0]), tmp_path / "job")
    assert [(step, r["loss"]) for step, r in raw_records(tmp_path / "job", "eval")] == want


def test_a_skipped_step_does_not_move_the_schedule(tmp_path, corpus, monkeypatch):
    """Megatron steps its scheduler only after a successful update: with step 2 skipped (64
    tokens a step), steps 1-8 take the rates at 0, 64, 64, 128, ... 384 tokens, not 0, 64,
    128, ... 448. The counter is checkpointed: a run stopped at step 5 and resumed gets the
    same rates and losses."""
    calls = _nan_after(monkeypatch, {2})
    extra = {"train": {"max_skipped_steps": 1}}
    ref = make_config(tmp_path / "ref", blend=corpus[0], **extra)
    pretrain(ref, tmp_path / "ref" / "job")
    train = [r for _, r in raw_records(tmp_path / "ref" / "job", "train")]
    assert [r["skipped"] for r in train] == [False, True] + [False] * 6
    sched = SchedulerConfig(warmup_tokens=128, stable_fraction_end=0.5)
    opt = OptimizerConfig(lr=3e-3, min_lr=3e-4)
    positions = [0, 64, 64, 128, 192, 256, 320, 384]
    assert [r["lr"] for r in train] == [learning_rate(t, 512, sched, opt) for t in positions]
    assert train[2]["lr"] == 1.5e-3  # still half-way through the warmup, not 3e-3

    calls["n"] = 0
    cfg = make_config(tmp_path, blend=corpus[0], **extra)

    def preempt(kind, payload):
        if kind == "train" and payload["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    pretrain(cfg, tmp_path / "job", on_event=preempt)
    saved = json.loads((tmp_path / "ckpt" / "iter_0000005" / "train_state.json").read_text())
    assert (saved["tokens"], saved["schedule_tokens"]) == (5 * 64, 4 * 64)
    pretrain(cfg, tmp_path / "job")
    resumed = [r for _, r in raw_records(tmp_path / "job", "train")]
    assert [(r["step"], r["lr"], r["loss"]) for r in resumed] == [
        (r["step"], r["lr"], r["loss"]) for r in train
    ]


def test_a_checkpoint_from_before_the_schedule_counter_resumes_where_its_schedule_was():
    """train_state.json without `schedule_tokens` (written when every step's tokens moved the
    schedule): the schedule continues from its `tokens`."""
    saved = {"step": 5, "tokens": 320, "skipped_steps": 1, "consecutive_nonfinite": 0}
    assert RunState.from_saved(saved).schedule_tokens == 320
    assert RunState.from_saved({**saved, "schedule_tokens": 256, "future_key": 1}).schedule_tokens == 256
