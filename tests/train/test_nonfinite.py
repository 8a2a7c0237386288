"""Non-finite values (issue 17): rates rejected by config validation, checkpoints only from
finite weights after a good step, the last good checkpoint named honestly, skipped steps in the
exit status, and an initialisation that cannot train."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from nemotron.cli.main import app
from nemotron.train import pretrain

from .conftest import make_config
from .test_faults import assert_one_line_failure, cli, result_of, tree_hashes  # noqa: F401
from .test_loop import _nan_after


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("optimizer.lr=.nan", "optimizer.lr"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-3e-4", "optimizer.lr"),
        ("optimizer.min_lr=.nan", "optimizer.min_lr"),
        ("optimizer.min_lr=-.inf", "optimizer.min_lr"),
        ("optimizer.eps=.inf", "optimizer.eps"),
        ("optimizer.weight_decay=.nan", "optimizer.weight_decay"),
        ("train.grad_clip=.inf", "train.grad_clip"),
        ("train.expert_bias_update_rate=.nan", "train.expert_bias_update_rate"),
        ("scheduler.stable_fraction_end=.nan", "scheduler.stable_fraction_end"),
        ("model.init_std=.inf", "model.init_std"),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps"),
        ("scheduler.on_resume=newest", "scheduler.on_resume"),
    ],
)
def test_non_finite_or_non_positive_rates_are_config_errors(tmp_path, monkeypatch, override, key):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)
    (tmp_path / "blend.json").write_text("{}")
    job = tmp_path / "job"
    result = CliRunner().invoke(
        app,
        [
            "nano3",
            "pretrain",
            "-c",
            "tiny",
            "--job-dir",
            str(job),
            f"data.blend={tmp_path / 'blend.json'}",
            override,
        ],
    )
    assert_one_line_failure(result, None, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blend.json"]  # nothing written


@pytest.mark.parametrize(
    "section,values",
    [
        ("optimizer", {"lr": float("inf")}),
        ("optimizer", {"lr": float("nan"), "min_lr": 0.0}),
        ("optimizer", {"min_lr": float("nan")}),
        ("scheduler", {"stable_fraction_end": float("nan")}),
    ],
)
def test_the_library_refuses_non_finite_rates_too(corpus, tmp_path, section, values):
    from nemotron.train.schedule import ScheduleConfigError

    cfg = make_config(tmp_path, blend=corpus[0], **{section: values})
    with pytest.raises(ScheduleConfigError, match=rf"{section}\.{next(iter(values))} must .*(nan|inf)"):
        pretrain(cfg, tmp_path / "job")
    assert not (tmp_path / "job").exists() and not (tmp_path / "ckpt").exists()


def test_a_checkpoint_is_never_written_during_a_skipped_streak(corpus, tmp_path):
    """lr 1e30: step 2 (the first with a non-zero rate) leaves finite but ~1e30 weights, and
    every later step is non-finite. The save due at step 4 is not written, and the checkpoint of
    step 2 is not called good: no finite step followed it."""
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        optimizer={"lr": 1e30, "min_lr": 1e29},
        train={"max_consecutive_nonfinite": 3},
        checkpoint={"save_interval": 2},
    )
    from nemotron.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg, tmp_path / "job")
    message = str(err.value)
    assert "no checkpoint of this run was followed by a finite step" in message
    assert f"{tmp_path / 'ckpt' / 'iter_0000002'} directly precedes these steps" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_0000002", "latest"]


def test_non_finite_weights_are_not_checkpointed(corpus, tmp_path, monkeypatch):
    """A step that looks good (finite loss and gradient norm) but leaves an infinite weight:
    its save is refused, and the error names the checkpoint before it as the last good one."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = make_config(tmp_path, blend=corpus[0], train={"max_consecutive_nonfinite": 1})
    events = []
    from nemotron.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg, tmp_path / "job", on_event=lambda kind, p: events.append((kind, p)))
    good = tmp_path / "ckpt" / "iter_0000003"
    assert f"the last good checkpoint (a finite step followed it) is {good}" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_0000003", "latest"]
    warnings = [p["message"] for kind, p in events if kind == "warning"]
    assert warnings == [
        "no checkpoint at step 6: the weights are not finite; the next good step saves instead"
    ]


@pytest.mark.parametrize(
    "allowed,exit_code,status", [(0, 1, "completed_with_skipped_steps"), (1, 0, "completed")]
)
def test_skipped_steps_end_non_zero_unless_allowed(
    cli, corpus, tmp_path, monkeypatch, allowed, exit_code, status
):
    _nan_after(monkeypatch, {3})
    cfg = make_config(tmp_path, blend=corpus[0], train={"max_skipped_steps": allowed})
    job = tmp_path / "job"
    result = cli(cfg, job)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    summary = result_of(job)
    assert summary["status"] == status and summary["skipped_steps"] == 1
    if exit_code:
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: pretrain completed_with_skipped_steps after 8 steps")
        assert "1 of 8 steps were skipped" in line and "train.max_skipped_steps=0" in line
    # The skipped step's save (step 3) moved to the next good step; the others are on time.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "iter_0000004",
        "iter_0000006",
        "iter_0000008",
        "latest",
    ]


@pytest.mark.parametrize(
    "init_std,symptom",
    [
        (1e6, "every gradient is zero"),  # saturated: loss ln(vocab), gradient norm exactly 0
        (1e8, "not finite"),  # overflows: NaN loss
    ],
)
def test_an_initialisation_that_cannot_train_is_flagged(cli, corpus, tmp_path, init_std, symptom):
    cfg = make_config(tmp_path, blend=corpus[0], model={"init_std": init_std})
    job = tmp_path / "job"
    assert_one_line_failure(cli(cfg, job), job, "first step", symptom, f"model.init_std={init_std}")
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("iter_*"))
