"""Render, submit and follow a `LaunchPlan` through NeMo-Run.

`render(plan)` is what `--dry-run` prints (the sbatch script, or the local torchrun command) and
writes nothing; `submit(plan, attached, log_sink)` launches the same thing: attached (`--run`) it
streams the job's log lines to `log_sink`, waits and returns the final state (Ctrl-C cancels the
job); detached (`--batch`) it returns as soon as Slurm accepted the job.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nemo_run as run
from torchx.specs import AppState
from torchx.specs.api import is_started, parse_app_handle

from nemotron.launch.executors import build_executor, build_task
from nemotron.launch.plan import EXPERIMENT_TITLE, LaunchError, LaunchPlan, check_detachable

LogSink = Callable[[str], None]

_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class JobResult:
    job_id: str  # Slurm job id, or the local process handle
    state: str  # SUCCEEDED, FAILED, CANCELLED, ... (RUNNING/PENDING/SUBMITTED when detached)
    log_dir: Path | str  # where the job's log files are (on the cluster for an SSH tunnel)
    job_dir: Path  # the submission's job dir on this machine
    handle: str = ""  # NeMo-Run / TorchX app handle

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def render(plan: LaunchPlan) -> str:
    """The submission exactly as `submit` would make it; writes nothing that outlives the call.

    NeMo-Run's own dry run is done into a temporary directory and its paths are mapped back
    to the plan's job dir: for Slurm the sbatch script, for a local profile the command line
    (working directory, environment, torchrun arguments) of the process it would start.
    """
    with _no_stdin(), tempfile.TemporaryDirectory(prefix="nemotron-dryrun-") as tmp:
        shadow = Path(tmp) / "launch"
        executor = build_executor(plan)
        if isinstance(getattr(executor, "tunnel", None), run.LocalTunnel):
            executor.tunnel = run.LocalTunnel(job_dir=str(shadow / "experiments"))
        with _quiet():
            with _experiment(plan, executor, shadow) as exp:
                exp.add(build_task(plan), name=plan.task_name)
                exp.dryrun(log=False, delete_exp_dir=False)
                exp_dir = Path(exp._exp_dir)
                job = exp.jobs[0]
        if plan.profile.is_slurm:
            scripts = sorted(exp_dir.glob("*_sbatch.sh"))
            if not scripts:
                raise LaunchError(f"NeMo-Run produced no sbatch script for {plan.experiment_id}")
            text = scripts[0].read_text()
        else:
            text = _local_command(job._dryrun_info.request)
    return text.replace(str(shadow), str(plan.nemo_run_dir))


def _local_command(request) -> str:
    """A shell rendering of the process(es) TorchX's local scheduler starts."""
    lines = []
    for replicas in request.role_params.values():
        for replica in replicas:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(replica.env.items()))
            lines.append(f"cd {shlex.quote(replica.cwd or os.getcwd())}")
            lines.append(f"env {env} {shlex.join(replica.args)}")
    return "\n".join(lines) + "\n"


def _experiment(plan: LaunchPlan, executor, base_dir: Path) -> run.Experiment:
    return run.Experiment(
        EXPERIMENT_TITLE,
        id=plan.experiment_id,
        base_dir=str(base_dir),
        executor=executor,
        clean_mode=True,
        log_level="ERROR",
        enable_goodbye_message=False,
        skip_status_at_exit=True,
    )


def submit(plan: LaunchPlan, attached: bool, log_sink: LogSink | None = None) -> JobResult:
    """Launch the plan. Attached: stream logs to `log_sink`, wait, return the final state;
    Ctrl-C (KeyboardInterrupt) cancels the job and re-raises. Detached: return once submitted."""
    check_detachable(plan.profile, attached)
    if plan.task_dir.exists():
        raise LaunchError(
            f"{plan.task_dir} exists: job dir {plan.job_dir} was already submitted; "
            f"every submission needs a fresh job dir"
        )
    plan.job_dir.mkdir(parents=True, exist_ok=True)
    sink = log_sink or (lambda line: None)
    with _no_stdin():
        exp, handle = _launch(plan)
        try:
            job_id = parse_app_handle(handle).app_id
            log_dir = plan.remote_task_dir
            if attached:
                state = _follow(exp, handle, plan, sink)
            else:
                state = _state(exp, handle)
            return JobResult(job_id, state, log_dir, plan.job_dir, handle)
        finally:
            with _quiet():
                exp.detach = True  # never let NeMo-Run block or print on exit
                try:
                    exp.__exit__(None, None, None)
                except Exception:  # noqa: BLE001 - cleanup must not hide the job's outcome
                    pass


def _launch(plan: LaunchPlan) -> tuple[run.Experiment, str]:
    """Submit through a NeMo-Run experiment kept open so the job can be followed."""
    executor = build_executor(plan)
    try:
        with _quiet():
            exp = _experiment(plan, executor, plan.nemo_run_dir)
            exp.__enter__()
            exp.add(build_task(plan), name=plan.task_name)
            exp.run(detach=True)
    except Exception as exc:  # NeMo-Run/invoke/TorchX raise many types; name the submission
        detail = getattr(getattr(exc, "result", None), "stderr", "") or str(exc)
        raise LaunchError(
            f"submitting {plan.stage} with profile '{plan.profile.name}' failed: {detail.strip()}"
        ) from exc
    job = exp.jobs[0]
    if not job.launched or not job.handle:
        raise LaunchError(f"NeMo-Run did not launch {plan.experiment_id}")
    return exp, job.handle


def _state(exp: run.Experiment, handle: str) -> str:
    status = exp._runner.status(handle)
    if status is None or status.state == AppState.UNKNOWN:
        return "SUBMITTED"  # accepted, not yet visible to accounting
    return status.state.name


def _follow(exp: run.Experiment, handle: str, plan: LaunchPlan, sink: LogSink) -> str:
    """Stream logs until the job reaches a terminal state; cancel it on Ctrl-C (or SIGTERM)."""
    stop = threading.Event()
    streamer = threading.Thread(target=_stream_logs, args=(exp, handle, plan, sink, stop), daemon=True)
    streamer.start()
    interrupted = threading.Event()
    try:
        with _interrupts_noted(interrupted):
            while True:
                status = exp._runner.status(handle)
                if interrupted.is_set():
                    # The signal came while sacct ran: invoke, which runs it, catches the
                    # KeyboardInterrupt (it forwards ^C to the command and waits on), so the
                    # interrupt would be lost and the job followed to its end.
                    raise KeyboardInterrupt("interrupted while the job's state was read")
                if status is not None and status.is_terminal():
                    state = status.state.name
                    break
                time.sleep(_POLL_SECONDS)
    except KeyboardInterrupt:
        with _quiet():
            exp._runner.cancel(handle)
        stop.set()
        raise
    # Let the log streamer drain what the job wrote last.
    streamer.join(timeout=15)
    stop.set()
    return state


@contextlib.contextmanager
def _interrupts_noted(interrupted: threading.Event):
    """While attached, Ctrl-C and SIGTERM (e.g. from `timeout` or a CI runner) set `interrupted`
    and raise KeyboardInterrupt, so the job is cancelled instead of left running unwatched,
    even when a library swallowed the exception. Only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stream_logs(exp, handle: str, plan: LaunchPlan, sink: LogSink, stop: threading.Event) -> None:
    """Log streaming is best effort (the job's state is what counts): errors become one line."""
    runner = exp._runner
    # Logs exist once the job started; the role name is the scheduler's (Slurm: the job name).
    while not stop.is_set():
        try:
            status = runner.status(handle)
        except Exception:  # noqa: BLE001 - transient (e.g. sacct not answering yet)
            status = None
        if status is not None and (is_started(status.state) or status.is_terminal()):
            break
        time.sleep(_POLL_SECONDS / 2)
    else:
        return
    seen, error, role = 0, None, plan.task_name
    try:
        app = runner.describe(handle)
        role = app.roles[0].name if app is not None and app.roles else plan.task_name
        for line in runner.log_lines(handle, role, k=0, should_tail=True):
            sink(line.rstrip("\n"))
            seen += 1
            if stop.is_set():
                return
    except Exception as exc:  # noqa: BLE001
        error = exc
    # The tail ends when the job does; what the scheduler flushed to the file after that moment
    # (often the last lines) is read once more from the complete file.
    time.sleep(1.0)
    try:
        for i, line in enumerate(runner.log_lines(handle, role, k=0, should_tail=False)):
            if i >= seen:
                sink(line.rstrip("\n"))
    except Exception as exc:  # noqa: BLE001
        sink(f"[nemotron] job logs unavailable: {error or exc}; see {plan.remote_task_dir}")


@contextlib.contextmanager
def _quiet():
    """NeMo-Run prints progress with rich; library code must not print."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


@contextlib.contextmanager
def _no_stdin():
    """The shell commands NeMo-Run runs through invoke (tar, sbatch, sacct) must not read (and
    consume) our stdin."""
    stdin = sys.stdin
    sys.stdin = io.StringIO()
    try:
        yield
    finally:
        sys.stdin = stdin
