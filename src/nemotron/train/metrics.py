"""Where training metrics go: a JSONL file in the job dir, Python logging, an event hook for the
CLI (progress bar), and TensorBoard / W&B when configured. Only rank 0 writes.

Every record of `metrics.jsonl` is one JSON object per line with `kind` (train | eval | test |
run: facts about the run, e.g. the corpus's unigram entropy),
`step`, `time` (unix seconds) and the values. A resumed run appends; for a step that was run
twice (after a crash) the later record wins (`read_metrics` applies that rule).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from nemotron.artifacts import wandb_lineage
from nemotron.train.config import LoggerConfig
from nemotron.utils.fs import naming

METRICS_FILE = "metrics.jsonl"
# Megatron logs an evaluation's perplexity as exp(min(20, loss)) (`evaluate_and_print_results`):
# the same cap keeps the two logs comparable.
PERPLEXITY_LOSS_CAP = 20.0


def perplexity(loss: float) -> float:
    """exp(loss), the loss capped at `PERPLEXITY_LOSS_CAP` as Megatron caps it."""
    return math.exp(min(loss, PERPLEXITY_LOSS_CAP))


log = logging.getLogger("nemotron.train")

EventHook = Callable[[str, dict[str, Any]], None]


class MetricsConfigError(ValueError):
    """A logger section that cannot be honoured (e.g. W&B asked for but not installed)."""


class MetricsFileError(ValueError):
    """A metrics.jsonl that cannot be read as a run's history (the message names the file and
    line)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def check_logger(cfg: LoggerConfig) -> None:
    """Raise MetricsConfigError when a logger the config asks for cannot be imported. Every rank
    calls it before the model is built: only rank 0 logs, and rank 0 failing alone later would
    leave the other ranks waiting in their first collective."""
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise MetricsConfigError(
                "logger.tensorboard=true needs tensorboard: pip install 'nemotron[tensorboard]'"
            ) from e
    if cfg.wandb and cfg.wandb_mode != "disabled":
        try:
            wandb_lineage.require_wandb()
        except wandb_lineage.WandbUnavailable as e:
            raise MetricsConfigError(str(e)) from e


def _scalars(values: dict[str, Any]) -> dict[str, float | int]:
    """The numbers TensorBoard and W&B chart: numeric values, and a list of numbers (a
    per-layer figure, e.g. `balance/per_layer_max_over_mean`) as one scalar per entry
    (`<key>/<index>`), so that each layer's load has its own curve there too."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{key}/{i}": v for i, v in enumerate(value)})
    return out


class MetricsLogger:
    def __init__(
        self,
        job_dir: str | Path,
        cfg: LoggerConfig,
        *,
        enabled: bool = True,
        on_event: EventHook | None = None,
        run_config: dict[str, Any] | None = None,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.on_event = on_event
        self.job_dir = Path(job_dir)
        self._file: TextIO | None = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.job_dir.mkdir(parents=True, exist_ok=True)
        torn = _drop_torn_tail(self.job_dir / METRICS_FILE)
        self._file = open(self.job_dir / METRICS_FILE, "a", buffering=1)
        if torn:
            # Appending after the torn bytes would glue this run's first record to them and
            # leave a corrupt line in the middle of the file.
            self.event(
                "warning",
                {
                    "message": f"{self.job_dir / METRICS_FILE}: dropped an incomplete last record "
                    f"({torn} bytes) that the previous run left when it was stopped mid-write"
                },
            )
        check_logger(cfg)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A run that starts (or resumes) at step s re-logs steps s+1 on: TensorBoard hides
            # what an earlier attempt on this job dir logged from there (it ran past its last
            # checkpoint, or the job dir was restarted from scratch), as `read_metrics` does.
            self._tb = SummaryWriter(log_dir=str(self.job_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb and cfg.wandb_mode != "disabled":
            try:
                self._wandb = wandb_lineage.start_run(
                    job_dir=self.job_dir,
                    job_type="pretrain",
                    project=cfg.wandb_project,
                    entity=cfg.wandb_entity,
                    mode=cfg.wandb_mode,
                    config=run_config,
                )
            except wandb_lineage.WandbUnavailable as e:
                raise MetricsConfigError(str(e)) from e

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        """A non-metric event (start, checkpoint, end, warning) for the CLI hook; without a hook
        a warning goes to the log rather than nowhere."""
        if not self.enabled:
            return
        if self.on_event is not None:
            self.on_event(kind, payload)
        elif kind == "warning":
            log.warning(payload["message"])

    def use_data_artifacts(self, blends: list[str | None]) -> None:
        """W&B: declare each data-prep output this run reads (`DataBlendsArtifact-pretrain`) as
        its input. A blend without data-prep metadata (hand-written) is reported, not fatal."""
        if self._wandb is None:
            return
        for blend in dict.fromkeys(b for b in blends if b):
            try:
                wandb_lineage.use_data_artifact(self._wandb, blend)
            except wandb_lineage.ArtifactError as e:
                self.event("warning", {"message": f"W&B data lineage not recorded: {e}"})

    def checkpoint_saved(self, path: str | Path, step: int) -> None:
        """A checkpoint is complete: tell the CLI, and log it to W&B as `ModelArtifact-pretrain`."""
        if self._wandb is not None:
            try:
                wandb_lineage.log_model_artifact(self._wandb, path)
            except wandb_lineage.ArtifactError as e:
                self.event("warning", {"message": f"W&B model artifact not logged: {e}"})
        self.event("checkpoint", {"path": str(path), "step": step})

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in values.items()})
        assert self._file is not None  # enabled
        with naming(self.job_dir / METRICS_FILE):  # a full disk says where
            self._file.write(json.dumps(record) + "\n")
        numeric = _scalars(values)
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in numeric.items()}, step=step)
        if kind == "run":
            log.info("run: %s", values)
        elif kind == "train":
            log.info(
                "step %d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f",
                step,
                values.get("loss", float("nan")),
                values.get("lr", float("nan")),
                values.get("grad_norm", float("nan")),
                values.get("tokens_per_second", 0.0),
            )
        else:
            log.info("step %d %s loss %.4f", step, kind, values.get("loss", float("nan")))
        if self.on_event is not None:
            self.on_event(kind, {"step": step, **values})

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with naming(self.job_dir / METRICS_FILE):  # its last flush can meet a full disk
                file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _drop_torn_tail(path: Path) -> int:
    """Cut a half-written last record off `path` (see `_torn_tail_length`); its length in bytes."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        chunk, pos, tail = 1 << 16, size, b""
        while pos > 0:  # backwards to the last newline; the file itself can be large
            pos = max(0, pos - chunk)
            f.seek(pos)
            tail = f.read(min(chunk, size - pos)) + tail
            if b"\n" in tail:
                break
        torn = _torn_tail_length(tail)
        if torn:
            f.truncate(size - torn)
    return torn


def _torn_tail_length(data: bytes) -> int:
    """Bytes after the last newline of `data`: a record a killed run left half-written (the
    logger writes whole lines, so a complete file ends with a newline or is empty)."""
    return len(data) - (data.rfind(b"\n") + 1)


def read_metrics(
    job_dir: str | Path, on_warning: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """The records of a job dir's metrics.jsonl as the run's final history, in step order.

    A resumed run appends from the step it resumed at, so the file can hold an abandoned
    stretch (steps a crashed attempt ran past its last checkpoint). A `train` record at step t
    that does not follow the file's last train step (a rewind), and a `run` record (written
    when a run starts) at step s below it, drop the records of every train/eval/test step from
    t (after s) on: what is shown is the latest attempt's, never a mix of two. Of records of
    the same (kind, step) the last wins.

    A last line without its newline (the run was killed mid-write) is skipped, and said so
    through `on_warning` (default: the `nemotron.train` logger). Anything else that is not a
    JSON object with an integer `step` raises MetricsFileError naming the file and line
    (a byte-order mark an editor put before the first record is skipped).
    """
    path = Path(job_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a training job dir")
    if not path.is_file():
        raise MetricsFileError(f"{path} is not a file (a training run writes its metrics there)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MetricsFileError(f"{path} cannot be read: {e.strerror or e}") from None
    torn = _torn_tail_length(data)
    lines = data[: len(data) - torn].split(b"\n")[:-1] if torn < len(data) else []
    if torn:
        warn = on_warning or log.warning
        warn(
            f"{path}:{len(lines) + 1}: skipped an incomplete last record ({torn} bytes without "
            f"a newline: the run was stopped while writing it)"
        )
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    last_train = None
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise MetricsFileError(f"{path}:{lineno} is not UTF-8 text: not a metrics record") from None
        except json.JSONDecodeError as e:
            raise MetricsFileError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise MetricsFileError(f"{path}:{lineno} is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # a number past Python's integer-parsing limit (4,300 digits)
            raise MetricsFileError(f"{path}:{lineno} is not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise MetricsFileError(
                f"{path}:{lineno} is a JSON {type(record).__name__}, not a metrics record (an object)"
            )
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise MetricsFileError(f"{path}:{lineno} has no step (a non-negative integer): step={step!r}")
        kind = record.get("kind", "train")
        if not isinstance(kind, str):
            raise MetricsFileError(f"{path}:{lineno} has a kind that is not a string: kind={kind!r}")
        rewind = None
        if kind == "train" and last_train is not None and step <= last_train:
            rewind = step  # this step and later ones are run again
        elif kind == "run" and last_train is not None and step < last_train:
            rewind = step + 1  # a run resumed at `step`: later steps are its own
        if rewind is not None:
            latest = {k: r for k, r in latest.items() if k[0] == "run" or k[1] < rewind}
        if kind == "train" or rewind is not None:
            last_train = step
        latest[(kind, step)] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r.get("kind", "")))
