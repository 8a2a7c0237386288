"""metrics.jsonl as a resumed, killed or damaged run leaves it: what `read_metrics` (and so
`nemotron nano3 plot`) shows, and the one error line for a file it cannot read."""

import json
import math

import pytest
from typer.testing import CliRunner

from nemotron.cli.main import app
from nemotron.train.config import LoggerConfig
from nemotron.train.metrics import METRICS_FILE, MetricsLogger, perplexity, read_metrics


def _write(job, lines: list, tail: bytes = b"") -> None:
    job.mkdir(parents=True, exist_ok=True)
    body = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    (job / METRICS_FILE).write_bytes(body + tail)


def _train(step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "lm_loss": loss, "lr": 0.1}


def test_a_resumed_run_replaces_what_the_abandoned_attempt_logged_past_its_resume_point(tmp_path):
    # Attempt 1 logs steps 1-6 (eval at 4) and dies; its checkpoint was step 2. Attempt 2
    # resumes there (run record at step 2), logs 3-4 and dies too: steps 5-6 and the eval at
    # 4 are attempt 1's, of weights that no longer exist, and must not be shown.
    first = [_train(s, 10.0 + s) for s in range(1, 7)] + [{"kind": "eval", "step": 4, "loss": 9.0}]
    second = [{"kind": "run", "step": 2, "unigram_entropy": 7.0}, _train(3, 3.0), _train(4, 4.0)]
    _write(tmp_path, first + second)
    shown = [(r["kind"], r["step"], r.get("lm_loss")) for r in read_metrics(tmp_path)]
    assert shown == [
        ("train", 1, 11.0),
        ("run", 2, None),
        ("train", 2, 12.0),
        ("train", 3, 3.0),
        ("train", 4, 4.0),
    ]
    # Without a run record (a mock corpus has no entropy) the first re-run train step rewinds.
    _write(tmp_path, [_train(s, 10.0 + s) for s in range(1, 7)] + [_train(3, 3.0)])
    assert [(r["step"], r["lm_loss"]) for r in read_metrics(tmp_path)] == [(1, 11.0), (2, 12.0), (3, 3.0)]


def test_a_torn_last_line_is_skipped_with_a_warning_and_cut_off_before_the_next_run_appends(tmp_path):
    _write(tmp_path, [_train(1, 1.0)], tail=b'{"kind": "train", "step": 2, "lm_lo')
    warnings: list[str] = []
    assert [r["step"] for r in read_metrics(tmp_path, warnings.append)] == [1]
    assert len(warnings) == 1 and f"{METRICS_FILE}:2" in warnings[0] and "incomplete" in warnings[0]
    events: list[tuple[str, dict]] = []
    logger = MetricsLogger(tmp_path, LoggerConfig(), on_event=lambda kind, p: events.append((kind, p)))
    logger.log("train", 2, {"lm_loss": 2.0})
    logger.close()
    assert [kind for kind, _ in events] == ["warning", "train"] and "incomplete" in events[0][1]["message"]
    assert [(r["step"], r["lm_loss"]) for r in read_metrics(tmp_path, warnings.append)] == [
        (1, 1.0),
        (2, 2.0),
    ]
    assert len(warnings) == 1  # the file is whole again


def test_a_full_disk_while_logging_names_the_metrics_file_and_a_resume_recovers(tmp_path):
    """A failed write() names no file: the run ended with the bare "[Errno 28] No space left
    on device". The torn record it leaves is cut off by the next logger."""
    import errno

    logger = MetricsLogger(tmp_path, LoggerConfig())
    logger.log("train", 1, {"lm_loss": 1.0})
    real = logger._file

    class Full:
        def write(self, text):
            real.write(text[:9])
            real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    logger._file = Full()  # type: ignore[assignment]
    with pytest.raises(OSError) as failure:
        logger.log("train", 2, {"lm_loss": 2.0})
    assert failure.value.filename == str(tmp_path / METRICS_FILE)
    real.close()
    logger = MetricsLogger(tmp_path, LoggerConfig(), on_event=lambda kind, p: None)
    logger.log("train", 2, {"lm_loss": 2.0})
    logger.close()
    assert [(r["step"], r["lm_loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0)]


@pytest.mark.parametrize(
    "line, message",
    [
        (b"\xff\xfe not text", ":2 is not UTF-8 text"),
        (b"[1, 2]", ":2 is a JSON list, not a metrics record"),
        (b'{"kind": "train", "step": "x"}', ":2 has no step"),
        (b'{"kind": "train"}', ":2 has no step"),
        (b'{"kind": "tra', ":2 is not valid JSON"),  # torn, then appended after: corrupt
        (b"[" * 100_000 + b"]" * 100_000, ":2 is not valid JSON (nested too deeply)"),
        (b'{"step": 1' + b"0" * 5000 + b"}", ":2 is not valid JSON (Exceeds the limit"),
    ],
)
def test_plot_of_an_unreadable_record_is_one_error_naming_file_and_line(tmp_path, line, message):
    _write(tmp_path, [_train(1, 1.0), line, _train(2, 2.0)])
    result = CliRunner().invoke(app, ["nano3", "plot", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / METRICS_FILE}{message}" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    "module, logger, needs",
    [
        ("wandb", {"wandb": True, "wandb_mode": "offline"}, "needs wandb"),
        ("tensorboard", {"tensorboard": True}, "needs tensorboard"),
    ],
)
def test_a_logger_that_is_not_installed_fails_before_anything_is_built(
    tmp_path, monkeypatch, module, logger, needs
):
    # Every rank checks (only rank 0 logs: rank 0 failing alone after the model is built would
    # leave the others waiting in a collective), and nothing is built or written first.
    import sys

    from nemotron.train import trainer
    from nemotron.train.metrics import MetricsConfigError

    from .conftest import make_config

    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    built = []
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: built.append(1))
    cfg = make_config(tmp_path, checkpoint={"save": None}, data={"mock": True}, logger=logger)
    with pytest.raises(MetricsConfigError, match=needs):
        trainer.Trainer.for_run(cfg, tmp_path / "job")
    assert not built and not (tmp_path / "job").exists()


def test_tensorboard_and_wandb_get_one_scalar_per_layer_of_a_per_layer_figure(tmp_path):
    from nemotron.train.metrics import _scalars

    values = {"lr": 0.1, "skipped": False, "balance/per_layer_max_over_mean": [1.5, 2.0], "note": "x"}
    assert _scalars(values) == {
        "lr": 0.1,
        "skipped": False,
        "balance/per_layer_max_over_mean/0": 1.5,
        "balance/per_layer_max_over_mean/1": 2.0,
    }


def test_each_train_record_holds_the_values_of_its_own_step(tmp_path, monkeypatch):
    # Independent of the trainer's bookkeeping: the optimizer's lr and the loss as the step
    # function returned them, and each MoE layer's routing counts (before the bias update) and
    # biases (after it), taken around the calls the loop makes.
    import torch

    from nemotron.train import balancing, pretrain, trainer

    from .conftest import make_config

    seen: list[dict] = []
    real_step, real_update = trainer.train_step, balancing.update_expert_biases

    def train_step(model, optimizer, *args, **kwargs):
        result = real_step(model, optimizer, *args, **kwargs)
        seen.append({"lr": optimizer.param_groups[0]["lr"], "lm_loss": result.lm_loss, "loss": result.loss})
        return result

    def update(layers, *args, **kwargs):
        layers = list(layers)
        counts = [layer.router.tokens_per_expert.double().clone() for layer in layers]
        stats = real_update(layers, *args, **kwargs)
        biases = [layer.router.expert_bias.float() for layer in layers]
        seen[-1]["max_over_mean"] = [float(c.max() / c.mean()) for c in counts]
        seen[-1]["bias_ranges"] = [float(b.max() - b.min()) for b in biases]
        seen[-1]["bias_range"] = float(torch.cat(biases).max() - torch.cat(biases).min())
        return stats

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(balancing, "update_expert_biases", update)
    cfg = make_config(
        tmp_path, checkpoint={"save": None}, data={"mock": True}, train={"train_iters": 4, "eval_iters": 0}
    )
    pretrain(cfg, tmp_path / "job")
    train = [r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and len(seen) == 4
    for record, step in zip(train, seen):
        assert (record["lr"], record["lm_loss"], record["loss"]) == (
            step["lr"],
            step["lm_loss"],
            step["loss"],
        )
        assert record["balance/per_layer_max_over_mean"] == pytest.approx(step["max_over_mean"], rel=1e-12)
        assert record["balance/max_over_mean"] == pytest.approx(max(step["max_over_mean"]), rel=1e-12)
        assert record["balance/per_layer_bias_range"] == pytest.approx(step["bias_ranges"], abs=1e-7)
        assert record["balance/bias_range"] == pytest.approx(step["bias_range"], abs=1e-7)
    assert train[-1]["lr"] > 0 and train[-1]["balance/bias_range"] > 0


def test_perplexity_is_capped_as_megatron_caps_it():
    """Megatron logs exp(min(20, loss)); a diverged run's eval ppl must read the same."""
    assert perplexity(2.5) == math.exp(2.5)
    assert perplexity(20.0) == math.exp(20.0)
    assert perplexity(37.0) == math.exp(20.0)  # was exp(37): not what Megatron's log shows
    assert math.isnan(perplexity(float("nan")))


def _tensorboard_points(job) -> dict[str, list[tuple[int, float]]]:
    """Each scalar's (step, value) points as TensorBoard's own reader shows them (it applies a
    writer's purge_step)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_hides_what_an_abandoned_attempt_logged_past_the_resume_point(tmp_path):
    # Attempt 1 logs steps 1-6 and dies after its checkpoint of step 3; attempt 2 resumes at 3.
    pytest.importorskip("torch.utils.tensorboard")
    cfg = LoggerConfig(tensorboard=True)
    first = MetricsLogger(tmp_path, cfg)
    for step in range(1, 7):
        first.log("train", step, {"lm_loss": 10.0 + step})
    first.close()
    second = MetricsLogger(tmp_path, cfg, start_step=3)
    for step in (4, 5):
        second.log("train", step, {"lm_loss": float(step)})
    second.close()
    assert _tensorboard_points(tmp_path)["train/lm_loss"] == [
        (1, 11.0),
        (2, 12.0),
        (3, 13.0),
        (4, 4.0),
        (5, 5.0),
    ]


def test_a_resumed_run_logs_each_step_once_to_tensorboard(tmp_path, corpus):
    """The trainer passes the step it resumes at: a run resumed from an earlier checkpoint of
    the same job dir re-logs steps 4-8 and TensorBoard shows one point per step, not two."""
    import dataclasses

    pytest.importorskip("torch.utils.tensorboard")
    from nemotron.train import pretrain

    from .conftest import make_config

    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 5, "eval_iters": 0})
    cfg.logger = dataclasses.replace(cfg.logger, tensorboard=True)
    pretrain(cfg, tmp_path / "job")
    rerun = dataclasses.replace(
        cfg.checkpoint, save=str(tmp_path / "ckpt2"), load=str(tmp_path / "ckpt" / "iter_0000003")
    )
    summary = pretrain(dataclasses.replace(cfg, checkpoint=rerun), tmp_path / "job")
    assert summary.resumed_from.endswith("iter_0000003")
    steps = [step for step, _ in _tensorboard_points(tmp_path / "job")["train/lm_loss"]]
    assert steps == [1, 2, 3, 4, 5]


def test_a_run_failing_reports_its_own_error_not_a_second_one_from_closing(corpus, tmp_path, monkeypatch):
    """A full disk failed a metrics write (an error naming metrics.jsonl); closing after it
    flushed onto the same disk and raised a bare ENOSPC in its place, naming nothing."""
    import errno

    import nemotron.train.trainer as trainer_module
    from nemotron.train import pretrain

    from .conftest import make_config

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "job" / METRICS_FILE))

    def close_on_a_full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "train_step", full_disk)
    monkeypatch.setattr(MetricsLogger, "close", close_on_a_full_disk)
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 2})
    with pytest.raises(OSError) as failure:
        pretrain(cfg, tmp_path / "job")
    assert failure.value.filename == str(tmp_path / "job" / METRICS_FILE)


def test_closing_names_the_metrics_file_when_its_last_flush_fails(tmp_path):
    import errno

    logger = MetricsLogger(tmp_path, LoggerConfig())
    real = logger._file

    class Full:
        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    logger._file = Full()  # type: ignore[assignment]
    with pytest.raises(OSError) as failure:
        logger.close()
    assert failure.value.filename == str(tmp_path / METRICS_FILE) and failure.value.errno == errno.ENOSPC
    logger.close()  # closed once: a second close does nothing
