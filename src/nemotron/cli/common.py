"""What every stage command shares: options, errors as one line, job dirs, plans, summaries.

Library code raises; this module turns exceptions into one `error: ...` line on stderr and a
non-zero exit code (1 for bad input or a failed run, 2 for contradictory options, 130 for Ctrl-C).
Set NEMOTRON_DEBUG=1 to see the traceback as well.

Heavy modules (torch, the configs, the library) are imported inside the commands, so that
`nemotron --help` and argument errors answer at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, TypeVar, overload

import typer
from rich.console import Console
from rich.syntax import Syntax

from nemotron.utils.fs import atomic_write_text

CONFIG_PANEL = "Configuration"
EXEC_PANEL = "Execution"
JOB_DIR_ENV = "NEMOTRON_JOB_DIR"  # set by `--run/--batch` submissions for the job-side CLI

# log_path=False: `console.log` would name its caller (always cli/progress.py), which tells a
# user nothing and takes a column from the message.
console = Console(highlight=False, soft_wrap=True, log_path=False)

ConfigOpt = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        metavar="NAME|PATH",
        rich_help_panel=CONFIG_PANEL,
        help="Recipe name shipped with the package (default, tiny, ...) or a YAML path.",
    ),
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="[KEY=VALUE]...",
        show_default=False,
        help="Dotted config overrides applied last, e.g. train.train_iters=100 model.num_experts=8.",
    ),
]
RunOpt = Annotated[
    Optional[str],
    typer.Option(
        "--run",
        "-r",
        metavar="PROFILE",
        rich_help_panel=EXEC_PANEL,
        help="Submit with the env.toml PROFILE, wait and stream logs (attached).",
    ),
]
BatchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--batch",
        "-b",
        metavar="PROFILE",
        rich_help_panel=EXEC_PANEL,
        help="Submit with the env.toml PROFILE and return at once (detached).",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        "-d",
        rich_help_panel=EXEC_PANEL,
        help="Print the resolved config and the execution plan; write nothing.",
    ),
]
JobDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--job-dir",
        metavar="DIR",
        rich_help_panel=EXEC_PANEL,
        envvar=JOB_DIR_ENV,
        show_envvar=False,
        help="Job directory for provenance and outputs (default: runs/<stage>/<UTC time>-<id>).",
    ),
]


class CliError(Exception):
    """A problem with the command line itself (exit code 2)."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line; return the Exit to raise."""
    message = " ".join(str(message).split())  # one line, whatever the exception text held
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn any exception raised before a run starts into one error line and an exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except CliError as exc:
        raise fail(str(exc), 2) from None
    except Exception as exc:  # noqa: BLE001 - the CLI's job is exactly this translation
        if os.environ.get("NEMOTRON_DEBUG"):
            traceback.print_exc()
        text = str(exc) or type(exc).__name__
        if not _self_explaining(exc) and type(exc).__name__ not in text:
            text = f"{type(exc).__name__}: {text}"
        raise fail(text, 1) from None


def _self_explaining(exc: BaseException) -> bool:
    """Errors whose message needs no exception class in front of it: this project's own (each
    written for the user, naming the file, key or line) and a path that is missing or of the
    other kind (the OS's own text says which: "[Errno 20] Not a directory: 'x'"). A foreign
    error (torch's RuntimeError, ...) keeps its class, which is part of what it says."""
    return type(exc).__module__.startswith("nemotron.") or isinstance(
        exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)
    )


def check_exclusive(run: str | None, batch: str | None) -> None:
    if run is not None and batch is not None:
        raise CliError("--run and --batch are mutually exclusive: pass one profile, attached or detached")


def process_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launch_world_size() -> int:
    """Processes in this launch (torchrun's WORLD_SIZE; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


@contextmanager
def launch_process_group(device: str) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1), join the launch's process group for the whole command;
    with one process nothing happens.

    A stage needs the group before it names its job dir: each process picking its own default
    (time + random suffix) would give every rank a different directory, so rank 0 picks the
    name and the group carries it to the others (`StageRun`). The training library uses a
    group it finds and leaves it alone. `device`: `train.device` (auto, cuda or cpu)."""
    if launch_world_size() <= 1:
        yield
        return
    import torch

    from nemotron.distributed.utils import launcher_process_group

    device_type = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with launcher_process_group(device_type, reported=(typer.Exit,)):
        yield


_Decision = TypeVar("_Decision")


def _decided_by_rank0(decide: Callable[[], _Decision]) -> _Decision:
    """`decide()` on rank 0 alone, its result on every rank of the process group; when rank 0
    fails, every rank fails with its message (rather than waiting for it in the first
    collective). Without a process group every process decides for itself."""
    # A process group exists only if torch.distributed was imported already; commands that
    # never need torch (data prep, dry runs) must not import it here.
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    import torch

    from nemotron.artifacts.jobdir import JobDirError

    box: list[Any] = [None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as exc:  # noqa: BLE001 - handed to the other ranks, raised below
            failure = exc
            box[0] = ("failed", str(exc) or type(exc).__name__)
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    if failure is not None:
        raise failure
    status, value = box[0]
    if status == "failed":
        raise JobDirError(f"rank 0 failed: {value}")
    return value


@overload
def absolute(path: str) -> str: ...
@overload
def absolute(path: None) -> None: ...
def absolute(path: str | None) -> str | None:
    """Local paths made absolute against the working directory (URIs and None unchanged)."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


def reproduce_command(stage_words: list[str], config: str, overrides: list[str]) -> str:

    return " ".join(["nemotron", *stage_words, "-c", shlex.quote(config), *map(shlex.quote, overrides)])


def print_config(yaml_text: str, title: str) -> None:
    from rich.text import Text

    console.rule(Text(title, style="bold"))  # the title names the config's path: no markup
    console.print(Syntax(yaml_text, "yaml", theme="ansi_dark", background_color="default"))


def print_job_dir(job_dir: Path) -> None:
    """The job dir's line: the path as it is ("[exp]" in it is no Rich markup)."""
    from rich.text import Text

    console.print(Text.assemble(("job dir", "bold"), f" {job_dir}"))


def print_plan(title: str, rows: list[tuple[str, Any]]) -> None:
    """Aligned `key  value` lines, never wrapped (paths stay copy-pasteable)."""
    from rich.text import Text

    console.print(Text(title, style="bold"))
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        line = Text(f"{key:<{width}}", style="bold cyan")
        line.append(f"  {value}")
        console.print(line)


def as_dict(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    if isinstance(result, dict):
        return dict(result)
    return (
        {k: v for k, v in vars(result).items() if not k.startswith("_")}
        if hasattr(result, "__dict__")
        else {"result": result}
    )


def submit_remote(
    *,
    stage: str,
    profile: str,
    attached: bool,
    config_yaml: str,
    job_dir: Path,
    overrides: list[str],
    config_source: str,
    dry_run: bool,
    predict=None,
    check=None,
) -> None:
    """`--run/--batch PROFILE`: plan the job with `nemotron.launch`, then render or submit it.

    The resolved config is written to the job dir (on a dry run: to a temporary file that is
    removed again) and the job runs `nemotron <stage> -c <that config>` with $NEMOTRON_JOB_DIR set.
    `predict(world_size)`, if given, adds plan rows for the profile's process count (dry run);
    `check(world_size, where)`, if given, raises when the config cannot run on that many
    processes (before anything is written or submitted, dry run or not).
    """
    try:
        from nemotron import launch
    except ImportError as exc:
        flag = "--run" if attached else "--batch"
        raise CliError(
            f"{flag} {profile}: submitting to an execution profile is not supported in this "
            f"install ({exc}); run locally without --run/--batch"
        ) from None
    from nemotron.artifacts import jobdir

    prof, env = launch.load_profile(profile)
    flag = "--run" if attached else "--batch"
    launch.check_detachable(prof, attached)  # before the dry run shows, or a job dir is made
    if check is not None:
        check(launch.world_size(stage, prof), f"{flag} {prof.name} ({env.path})")
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="nemotron-dryrun-") as tmp:
            config_path = Path(tmp) / jobdir.CONFIG_FILE
            config_path.write_text(config_yaml)
            plan = launch.build_launch_plan(stage, config_path, prof, job_dir, env.wandb)
            text = launch.render(plan).replace(str(config_path), str(job_dir / jobdir.CONFIG_FILE))
        print_config(config_yaml, "resolved config")
        print_plan(
            "plan (dry run: nothing written)",
            [
                ("stage", stage),
                ("where", f"profile '{prof.name}' from {env.path} ({flag}, executor {prof.executor})"),
                (
                    "processes",
                    f"{plan.nodes} node(s) x "
                    f"{plan.nproc_per_node if plan.spec.distributed else plan.tasks_per_node}",
                ),
                ("config", f"{job_dir / jobdir.CONFIG_FILE} (written at submission)"),
                ("job dir", str(job_dir)),
                *(predict(plan.nodes * plan.nproc_per_node) if predict is not None else []),
            ],
        )
        console.rule("[bold]submission")
        console.print(text, markup=False)
        return
    info = jobdir.provenance(
        stage, argv(), overrides, config_source, extra={"profile": prof.name, "attached": attached}
    )
    job_dir = jobdir.create_job_dir(job_dir, config_yaml=config_yaml, info=info)
    plan = launch.build_launch_plan(stage, job_dir / jobdir.CONFIG_FILE, prof, job_dir, env.wandb)
    print_job_dir(job_dir)
    console.print(f"submitting {stage} with profile '{prof.name}' ({flag})", markup=False)
    result = launch.submit(plan, attached, lambda line: print(line, flush=True))
    values = as_dict(result)
    print_plan(
        "submitted" if not attached else "job finished",
        [(k.replace("_", " "), str(v)) for k, v in values.items()],
    )
    if attached and not getattr(result, "succeeded", True):
        raise fail(
            f"job {getattr(result, 'job_id', '')} ended {getattr(result, 'state', 'unsuccessfully')}; "
            f"logs: {getattr(result, 'log_dir', job_dir)}",
            1,
        )


def argv() -> list[str]:
    return list(sys.argv)


def open_job_dir(
    path: Path, *, stage: str, config_yaml: str, overrides: list[str], config_source: str
) -> Path:
    """Create the job dir (config.yaml + job.json, atomically), or join one a submission made.

    A job started by `--run/--batch` finds its directory in $NEMOTRON_JOB_DIR, already holding
    the submission's config.yaml and job.json; the job side then adds run.json (its own host,
    start time and argv). Only rank 0 writes.
    """
    from nemotron.artifacts import jobdir

    info = jobdir.provenance(stage, argv(), overrides, config_source)
    path = Path(path).absolute()
    from_submission = os.environ.get(JOB_DIR_ENV) and Path(os.environ[JOB_DIR_ENV]).absolute() == path
    if from_submission and path.is_dir():
        if process_rank() == 0:
            if not (path / jobdir.CONFIG_FILE).exists():
                atomic_write_text(path / jobdir.CONFIG_FILE, config_yaml)
            atomic_write_text(path / "run.json", json.dumps(info, indent=2) + "\n")
        return path
    if process_rank() != 0:
        return path
    return jobdir.create_job_dir(path, config_yaml=config_yaml, info=info)


@dataclasses.dataclass
class StageRun:
    """Where a stage command runs and records itself: the job dir (given or default), and the
    execution profile when submitted with --run (attached) or --batch (detached)."""

    stage: str
    job_dir: Path
    profile: str | None
    attached: bool
    overrides: list[str]
    config_source: str

    @classmethod
    def from_options(
        cls,
        stage: str,
        job_dir: Path | None,
        run: str | None,
        batch: str | None,
        overrides: list[str],
        config_source: str | Path,
    ) -> "StageRun":
        from nemotron.artifacts.jobdir import default_job_dir

        if job_dir is not None:
            target = Path(job_dir).absolute()
        else:  # one name for every rank of a launch (see `launch_process_group`)
            target = _decided_by_rank0(lambda: default_job_dir(stage).absolute())
        return cls(
            stage=stage,
            job_dir=target,
            profile=run if run is not None else batch,
            attached=run is not None,
            overrides=list(overrides),
            config_source=str(config_source),
        )

    @property
    def local(self) -> bool:
        return self.profile is None

    def submit(self, config_yaml: str, dry_run: bool, predict=None, check=None) -> None:
        """Hand the job to its profile (see `submit_remote`)."""
        assert self.profile is not None  # only a non-local stage submits
        submit_remote(
            stage=self.stage,
            profile=self.profile,
            attached=self.attached,
            config_yaml=config_yaml,
            job_dir=self.job_dir,
            overrides=self.overrides,
            config_source=self.config_source,
            dry_run=dry_run,
            predict=predict,
            check=check,
        )

    def open(self, config_yaml: str) -> Path:
        """Create (or join) the job dir for a local run and say where it is (rank 0). Under a
        process group the other ranks go on only once rank 0 has created it, and fail with
        rank 0 when it cannot."""
        self.job_dir = _decided_by_rank0(
            lambda: open_job_dir(
                self.job_dir,
                stage=self.stage,
                config_yaml=config_yaml,
                overrides=self.overrides,
                config_source=self.config_source,
            )
        )
        if process_rank() == 0:
            print_job_dir(self.job_dir)
        return self.job_dir


def record_failure(job_dir: Path, exc: BaseException) -> None:
    """result.json (status failed/interrupted) and error.txt with the traceback, best effort."""
    from nemotron.artifacts import jobdir

    if process_rank() != 0 or not job_dir.is_dir():
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    # result.json first and on its own: it is what says the run ended, and it is short (on a
    # full disk the long traceback is the write that fails). Both whole or not at all.
    with contextlib.suppress(OSError):
        jobdir.finish_job_dir(job_dir, status, {"error": f"{type(exc).__name__}: {exc}"})
    with contextlib.suppress(OSError):
        atomic_write_text(job_dir / "error.txt", "".join(traceback.format_exception(exc)))


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGTERM and SIGUSR1 held back (delivered when the block ends) while a failure is recorded
    and said: under torchrun, a rank failing makes the agent SIGTERM every other worker, which
    killed a rank between its own error and its result.json (nothing recorded in the job dir)."""
    held = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_stage(fn, job_dir: Path):
    """Run the library entry point; on failure record it in the job dir and exit with one line."""
    try:
        return fn()
    except KeyboardInterrupt as exc:
        with stop_signals_held():
            record_failure(job_dir, exc)
            # A Ctrl-C that stops at once (in training the second: the first, like SIGTERM/SIGUSR1,
            # checkpoints after the step and returns): say how to pick the run up.
            exit_ = fail(
                f"interrupted; job dir {job_dir}; -c {job_dir / 'config.yaml'} reruns it, "
                "resuming from what was saved",
                130,
            )
        raise exit_ from None
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - also torch's BaseException-derived errors
        with stop_signals_held():
            record_failure(job_dir, exc)
            if os.environ.get("NEMOTRON_DEBUG"):
                traceback.print_exc()
            where = job_dir / "error.txt"
            note = f" (traceback: {where})" if where.exists() else ""
            text = str(exc) or type(exc).__name__
            if not isinstance(exc, Exception):  # e.g. DCP's CheckpointException: a traceback dump
                text = text.strip().splitlines()[0]
            if not _self_explaining(exc):
                text = f"{type(exc).__name__}: {text}"
            exit_ = fail(f"{text}{note}", 1)
        raise exit_ from None
