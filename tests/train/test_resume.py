"""kill -9 at an arbitrary step, resume: same per-step losses and final state, bit for bit."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from nemotron.train import pretrain
from nemotron.train.checkpoint import LATEST_FILE
from nemotron.train.metrics import read_metrics

from .conftest import make_config

RUNNER = Path(__file__).with_name("_kill_runner.py")


def run(cfg, job_dir: Path, kill_at: str | None = None) -> int:
    cfg_file = job_dir.parent / f"{job_dir.name}.pkl"
    cfg_file.write_bytes(pickle.dumps(cfg))
    args = [sys.executable, str(RUNNER), str(cfg_file), str(job_dir)]
    if kill_at is not None:
        args.append(kill_at)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if kill_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def final_state(save_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{save_dir.parent.name}-final.pt"
    dcp_to_torch_save(save_dir / "iter_0000008", out)
    return torch.load(out, weights_only=False)


def losses(job_dir: Path) -> dict:
    return {
        (r["kind"], r["step"]): (r["loss"], r.get("lr"), r.get("phase"))
        for r in read_metrics(job_dir)
        if r["kind"] != "run"
    }


def assert_same_state(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    cfg = make_config(root, blend=corpus[0], phase2_blend=corpus[1])
    pretrain(cfg, root / "job")  # in this process: same code and thread count as the runner
    return cfg, losses(root / "job"), final_state(root / "ckpt", root)


@pytest.mark.parametrize(
    "async_save,kill_at,resumes_from,num_workers",
    [
        # killed with the async save of step 6 in flight (it must not count); resumes before the
        # phase switch (step 4) and crosses it again
        (True, "train:7", 3, 0),
        # killed once the async save of step 6 completed: resumes in phase 2 from it
        (True, "checkpoint:6", 6, 0),
        # background loader workers had read ahead past step 7 when killed: the resumed run (and
        # the whole run) still reads what the synchronous reference read
        pytest.param(True, "train:7", 3, 2, marks=pytest.mark.slow),  # spawns workers 4 times: ~55 s
    ],
)
def test_kill9_resume_is_bit_exact(
    tmp_path, corpus, reference, async_save, kill_at, resumes_from, num_workers
):
    _, ref_losses, ref_state = reference
    cfg = make_config(tmp_path, blend=corpus[0], phase2_blend=corpus[1])
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, async_save=async_save)
    cfg.data = dataclasses.replace(cfg.data, num_workers=num_workers)
    job, save = tmp_path / "job", tmp_path / "ckpt"

    assert run(cfg, job, kill_at=kill_at) == -9
    assert (save / LATEST_FILE).read_text().strip() == f"iter_{resumes_from:07d}"
    if kill_at == "train:7":
        assert (save / ".tmp-iter_0000006").exists() and not (save / "iter_0000006").exists()

    run(cfg, tmp_path / "job")  # auto-resumes from the save dir
    state = json.loads((save / "iter_0000008" / "train_state.json").read_text())
    assert state["loader"]["phase"] == 2 and state["loader"]["phase2_start_sample"] == 16
    assert losses(job) == ref_losses
    assert_same_state(final_state(save, tmp_path), ref_state)


def checkpoint_state(checkpoint: Path, tmp_path: Path) -> dict:
    """Everything a checkpoint holds, per tensor: model and optimizer (DCP), RNG states, run
    state (step, tokens, loader position, schedule)."""
    out = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    rng = torch.load(checkpoint / "rng" / "rank_00000.pt", weights_only=False)
    return {
        "dcp": torch.load(out, weights_only=False),
        "rng": {
            "python": rng["python"],
            # (name, keys array, pos, has_gauss, cached_gaussian): per entry, the array as a tensor
            "numpy": {
                i: torch.as_tensor(x) if hasattr(x, "shape") else x for i, x in enumerate(rng["numpy"])
            },
            "torch": rng["torch"],
        },
        "train_state": json.loads((checkpoint / "train_state.json").read_text()),
    }


def train_records(job_dir: Path) -> dict:
    return {
        r["step"]: (r["loss"], r["lr"], r["grad_norm"], r["tokens"])
        for r in read_metrics(job_dir)
        if r["kind"] == "train"
    }


@pytest.mark.parametrize("change", ["intervals", "train_iters"])
def test_resume_with_a_changed_config_continues_bit_for_bit(tmp_path, corpus, change):
    """N steps straight == a few steps, resume (in this process), the rest: every parameter,
    optimizer moment, RNG state, the loader position, the learning rate and the per-step loss
    and gradient norm identical, bit for bit.
    - intervals: the resumed run logs and evaluates at other steps (log_interval 2,
      eval_interval 3 instead of 1 and 4): the evaluations read the valid split only, so the
      training is untouched (only consumed_valid_samples differs).
    - train_iters: 8 -> 12 with scheduler.on_resume=config; the straight run has 12 from the
      start (the rates of steps 1-3 are the same under both schedules: warmup 2 steps, then
      constant until half way)."""
    total = 12 if change == "train_iters" else 8
    straight = make_config(tmp_path / "straight", blend=corpus[0], train={"train_iters": total})
    pretrain(straight, tmp_path / "straight" / "job")

    first = make_config(tmp_path / "first", blend=corpus[0], train={"train_iters": 8})
    pretrain(first, tmp_path / "first" / "job")
    resumed_save = tmp_path / "resumed" / "ckpt"
    resumed_save.mkdir(parents=True)
    shutil.copytree(tmp_path / "first" / "ckpt" / "iter_0000003", resumed_save / "iter_0000003")
    if change == "intervals":
        resumed = make_config(
            tmp_path / "resumed", blend=corpus[0], train={"log_interval": 2, "eval_interval": 3}
        )
    else:
        resumed = make_config(tmp_path / "resumed", blend=corpus[0], train={"train_iters": 12})
        resumed.scheduler = dataclasses.replace(resumed.scheduler, on_resume="config")
    summary = pretrain(resumed, tmp_path / "resumed" / "job")
    assert summary.resumed_from == str(resumed_save / "iter_0000003") and summary.steps == total
    assert [w for w in summary.warnings if w.startswith("data settings differ")] == []

    ref_train, got_train = (
        train_records(tmp_path / "straight" / "job"),
        train_records(tmp_path / "resumed" / "job"),
    )
    assert set(got_train) == {
        s for s in range(4, total + 1) if s % resumed.train.log_interval == 0 or s == total
    }
    for step, record in got_train.items():
        assert record == ref_train[step], f"step {step}"
    for step in sorted({s for s in (6, total) if s > 3}):  # checkpoints after the resume
        ref = checkpoint_state(tmp_path / "straight" / "ckpt" / f"iter_{step:07d}", tmp_path)
        got = checkpoint_state(resumed_save / f"iter_{step:07d}", tmp_path)
        if change == "intervals":  # evaluated at other steps: another count of valid samples read
            for state in (got, ref):
                del state["train_state"]["loader"]["consumed_valid_samples"]
        assert_same_state(got, ref, f"iter {step}")


def test_resume_with_another_data_seed_says_the_order_changed(tmp_path, corpus):
    """train.seed shuffles the documents and samples: a checkpoint resumed under another seed
    continues at its sample position of another order (samples read twice or never), which
    the run announces as a warning naming the setting (before: silently)."""
    first = make_config(tmp_path / "first", blend=corpus[0], train={"train_iters": 4})
    pretrain(first, tmp_path / "first" / "job")
    resumed = make_config(
        tmp_path / "resumed",
        blend=corpus[0],
        train={"train_iters": 4, "seed": 99},
        checkpoint={"load": str(tmp_path / "first" / "ckpt" / "iter_0000003")},
    )
    summary = pretrain(resumed, tmp_path / "resumed" / "job")
    assert summary.steps == 4
    (warning,) = [w for w in summary.warnings if w.startswith("data settings differ")]
    assert "iter_0000003" in warning and "train.seed 1234 -> 99" in warning and "at sample 12 " in warning


def test_resume_warns_of_a_changed_split_string_but_not_of_the_same_cut(tmp_path, corpus):
    """data.split decides which documents of a blend of one for every split each split reads:
    a resume under another cut warns as another seed does; "98,2" and "98,2,0" cut alike (the
    same split bounds), so no warning there."""
    train_prefixes = json.loads(corpus[0].read_text())["train"]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(train_prefixes))  # Megatron's --data-path form
    first = make_config(tmp_path / "first", blend=single, train={"train_iters": 4})
    first.data = dataclasses.replace(first.data, split="98,2")
    pretrain(first, tmp_path / "first" / "job")
    for split, warned in (("98,2,0", False), ("90,10", True)):
        resumed = make_config(
            tmp_path / split,
            blend=single,
            train={"train_iters": 4},
            checkpoint={"load": str(tmp_path / "first" / "ckpt" / "iter_0000003")},
        )
        resumed.data = dataclasses.replace(resumed.data, split=split)
        summary = pretrain(resumed, tmp_path / split / "job")
        warnings = [w for w in summary.warnings if w.startswith("data settings differ")]
        assert len(warnings) == warned, (split, warnings)
        if warned:
            assert "data.split '98,2' -> '90,10'" in warnings[0]


def test_resume_from_a_checkpoint_whose_config_sections_are_not_tables(tmp_path, corpus):
    """config.json rewritten (its manifest made to match) with a `train` section that is a
    list and a `data` section that is a string: the data-order comparison has nothing to
    compare there and the run resumes (before: AttributeError: 'list' object has no attribute
    'get'; a string section was even searched for the key as a substring)."""
    from nemotron.train.checkpoint import describe_files, manifest_json

    first = make_config(tmp_path / "first", blend=corpus[0], train={"train_iters": 4})
    pretrain(first, tmp_path / "first" / "job")
    checkpoint = tmp_path / "first" / "ckpt" / "iter_0000003"
    saved = json.loads((checkpoint / "config.json").read_text())
    saved["train"], saved["data"] = [1], "seed blend split"
    (checkpoint / "config.json").write_text(json.dumps(saved))
    (checkpoint / "manifest.json").write_text(manifest_json(describe_files(checkpoint), 3))
    resumed = make_config(
        tmp_path / "resumed",
        blend=corpus[0],
        train={"train_iters": 4, "seed": 99},
        checkpoint={"load": str(checkpoint)},
    )
    summary = pretrain(resumed, tmp_path / "resumed" / "job")
    assert summary.steps == 4 and summary.resumed_from == str(checkpoint)
    assert [w for w in summary.warnings if w.startswith("data settings differ")] == []


def test_resume_with_fewer_samples_than_the_checkpoint_read_is_one_error(tmp_path, corpus):
    """A checkpoint of global batch 4 at step 3 has read 12 samples; resumed under global batch
    2 with the same train_iters, the training order holds 8, and the next
    step would read past it. Megatron refuses it too; before, a bare "IndexError: sample 12 out
    of range 0..7 of the blend", naming no setting."""
    from nemotron.train.plan import TrainDataError

    first = make_config(tmp_path / "first", blend=corpus[0], train={"train_iters": 4})
    pretrain(first, tmp_path / "first" / "job")
    resumed = make_config(
        tmp_path / "resumed",
        blend=corpus[0],
        train={"train_iters": 4, "global_batch_size": 2, "micro_batch_size": 2},
        scheduler={"on_resume": "config"},
        checkpoint={"load": str(tmp_path / "first" / "ckpt" / "iter_0000003")},
    )
    with pytest.raises(
        TrainDataError, match=r"loader\.consumed_train_samples=12, more than train\.train_iters"
    ):
        pretrain(resumed, tmp_path / "resumed" / "job")


def test_which_checkpoint_a_start_takes_is_said_when_save_holds_a_newer_one(tmp_path, corpus):
    """`checkpoint.load` is where a run starts, every time (as Megatron's --load): a requeued
    command naming one checkpoint restarted there at each requeue with no word, and finetune
    passed over its `load` for a checkpoint of `save` silently. Both are said now."""
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 6}, checkpoint={"save_interval": 2})
    pretrain(cfg, tmp_path / "first")
    save = Path(cfg.checkpoint.save)
    assert [p.name for p in sorted(save.glob("iter_*"))] == ["iter_0000002", "iter_0000004", "iter_0000006"]

    rollback = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=str(save / "iter_0000002"))
    )
    summary = pretrain(rollback, tmp_path / "second")
    assert summary.resumed_from == str(save / "iter_0000002")
    (note,) = [w for w in summary.warnings if w.startswith("started from checkpoint.load=")]
    assert f"holds the newer {save / 'iter_0000006'}" in note and f"give checkpoint.load={save}" in note
    # Named as the save dir (its newest checkpoint), nothing newer: no note.
    resume = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=str(save)))
    summary = pretrain(resume, tmp_path / "third")
    assert not [w for w in summary.warnings if "checkpoint.load" in w]

    finetune = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=str(save / "iter_0000002"), finetune=True)
    )
    summary = pretrain(finetune, tmp_path / "fourth")
    assert summary.resumed_from == str(save / "iter_0000006") and summary.finetuned_from is None
    (note,) = [w for w in summary.warnings if "is not read" in w]
    assert note.startswith(
        f"checkpoint.load={save / 'iter_0000002'} is not read: checkpoint.save already holds"
    )
