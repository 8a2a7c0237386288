"""Rich rendering of the library's progress reports: the training loop's events and data prep's
progress callback (the library only emits them)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


def say(console: Console, text: str, warning: bool = False) -> None:
    """One line of the run's log. `text` is the library's (paths, messages), never markup: a
    checkpoint path with "[exp]" in it printed as "/runs//iter_..." before. Off a terminal (a
    Slurm log, a pipe) the line is written whole, with `console.log`'s time stamp: that log
    wraps at 80 columns, splitting a path or a step's numbers over two lines."""
    if console.is_terminal:
        console.log(("[yellow]warning[/]: " if warning else "") + escape(text))
    else:
        stamp = time.strftime("[%H:%M:%S] ")
        console.print(
            stamp + ("warning: " if warning else "") + text, markup=False, highlight=False, soft_wrap=True
        )


class TrainProgress:
    """An `on_event` hook for `nemotron.train.pretrain`: a progress bar plus one line per milestone."""

    def __init__(self, console: Console, show_bar: bool = True):
        self.console = console
        # Off a terminal (a Slurm log, a pipe) Rich draws the bar once, at the end, squeezed
        # into 80 columns: the step count and the loss are cut to "…". There the bar gives way
        # to one whole line per logged step (train.log_interval), as Megatron's log has.
        self.step_lines = show_bar and not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=not show_bar or self.step_lines,
            transient=False,
        )
        self.task: TaskID | None = None
        self.total_steps = 0
        self.final_pass = False  # set by the loop's "final_pass" event (after its last step)

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "start":
            if payload.get("ignored_layout"):
                say(
                    self.console,
                    f"one process: {payload['ignored_layout']} not applied (the whole "
                    "model trains on one device; start with torchrun for the layout)",
                )
            if payload.get("fp8"):
                say(self.console, payload["fp8"])
            # Say where the run starts, so a rerun that resumed (auto_resume) is not mistaken
            # for one that started over.
            if payload.get("resumed_from"):
                say(self.console, f"resumed from {payload['resumed_from']} at step {payload['step']}")
            elif payload.get("finetuned_from"):
                say(self.console, f"started from the weights of {payload['finetuned_from']} (finetune)")
            self.progress.start()
            self.total_steps = payload["total_steps"]
            self.task = self.progress.add_task("", total=payload["total_steps"], completed=payload["step"])
        elif kind == "train" and self.task is not None:
            # The LM loss (cross-entropy, without the balance-loss term) and the last step's
            # throughput; the end-of-run summary shows the final LM loss and the run average.
            loss = payload.get("lm_loss", payload["loss"])
            desc = f"LM loss {loss:.4f}  lr {payload['lr']:.2e}"
            if payload.get("tokens_per_second"):
                desc += f"  {payload['tokens_per_second']:,.0f} tok/s (last step)"
            if self.step_lines:  # one whole line, however long (`say`)
                say(self.console, f"step {payload['step']}/{self.total_steps}  {desc}")
            self.progress.update(self.task, completed=payload["step"], description=desc)
        elif kind == "final_pass":
            self.final_pass = True
        elif kind in ("eval", "valid", "test"):  # the loop logs validation as "eval"
            split = "test" if kind == "test" else "valid"
            # The final validation pass reads the next valid batches, so at a step that has
            # just evaluated it shows a second, different valid loss: say which one it is.
            note = " (final pass)" if self.final_pass and split == "valid" else ""
            say(self.console, f"{split} loss {payload['loss']:.4f} at step {payload['step']}{note}")
        elif kind == "checkpoint":
            say(self.console, f"checkpoint saved: {payload['path']}")
        elif kind == "phase":
            say(self.console, f"switched to the phase-{payload['phase']} blend at step {payload['step']}")
        elif kind == "warning":
            say(self.console, payload["message"], warning=True)
        elif kind == "stop":
            where = f"signal {payload.get('signal')} at step {payload['step']}"
            if payload.get("checkpoint"):
                say(self.console, f"{where}: checkpoint {payload['checkpoint']} saved, stopping")
            else:
                resume = payload.get("resume_from")
                since = (
                    f"resumes from {resume}" if resume else "starts from the beginning (no checkpoint yet)"
                )
                say(
                    self.console,
                    f"{where}: stopping without a checkpoint of this step; a rerun {since}",
                    warning=True,
                )
        elif kind == "end":
            self.progress.stop()


class PrepProgressView:
    """A `progress=` callback for `nemotron.data.prep.run_data_prep`: a bar over the work
    units, documents / tokens / throughput beside it, and one line per phase message."""

    def __init__(self, console: Console, show_bar: bool = True):
        self.console = console
        # Off a terminal the bar would be drawn once, at the end, in 80 columns (as
        # TrainProgress's): instead a whole line at every tenth of the units, and the last.
        self.step_lines = show_bar and not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=not show_bar or self.step_lines,
            transient=False,
        )
        self.task: TaskID | None = None
        self._message = ""
        self._tasks: dict[str, int] = {}
        self._tenth = -1  # the last tenth of the units a line was written for

    def __call__(self, report: Any) -> None:
        if report.message and report.message != self._message:
            self._message = report.message
            say(self.console, report.message)
        if getattr(report, "warning", ""):
            say(self.console, report.warning, warning=True)
        tasks = getattr(report, "tasks", None) or {}
        if tasks and tasks != self._tasks:
            # Several tasks (nodes) share the prep: units done by each, when it changes.
            self._tasks = dict(tasks)
            say(self.console, "units done per task: " + ", ".join(f"{k} {v}" for k, v in tasks.items()))
        if self.task is None and report.units_total:
            self.progress.start()
            self.task = self.progress.add_task("", total=report.units_total, phase=report.phase)
        if self.task is not None:
            description = (
                f"{report.documents:,} docs  {report.tokens:,} tokens  {report.tokens_per_s:,.0f} tok/s"
            )
            tenth = 10 * report.units_done // max(report.units_total, 1)
            if self.step_lines and tenth > self._tenth:
                self._tenth = tenth
                say(
                    self.console,
                    f"{report.phase} {report.units_done}/{report.units_total} units  {description}",
                )
            self.progress.update(
                self.task, completed=report.units_done, phase=report.phase, description=description
            )
        if report.phase == "done":
            self.stop()

    def stop(self) -> None:
        # A bar never started (the prep failed before planning) would still print an empty
        # line, ahead of the error line.
        if self.task is not None:
            self.progress.stop()
