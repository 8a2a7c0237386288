"""Rich rendering of the library's progress reports: the training loop's events and data prep's
progress callback (the library only emits them)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


class TrainProgress:
    """An `on_event` hook for `nemotron.train.pretrain`: a progress bar plus one line per milestone."""

    def __init__(self, console: Console, show_bar: bool = True):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=not show_bar,
            transient=False,
        )
        self.task: TaskID | None = None
        self.final_pass = False  # set by the loop's "final_pass" event (after its last step)

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "start":
            if payload.get("ignored_layout"):
                self.console.log(
                    f"one process: {payload['ignored_layout']} not applied (the whole "
                    "model trains on one device; start with torchrun for the layout)"
                )
            if payload.get("fp8"):
                self.console.log(payload["fp8"])
            # Say where the run starts, so a rerun that resumed (auto_resume) is not mistaken
            # for one that started over.
            if payload.get("resumed_from"):
                self.console.log(f"resumed from {payload['resumed_from']} at step {payload['step']}")
            elif payload.get("finetuned_from"):
                self.console.log(f"started from the weights of {payload['finetuned_from']} (finetune)")
            self.progress.start()
            self.task = self.progress.add_task("", total=payload["total_steps"], completed=payload["step"])
        elif kind == "train" and self.task is not None:
            # The LM loss (cross-entropy, without the balance-loss term) and the last step's
            # throughput; the end-of-run summary shows the final LM loss and the run average.
            loss = payload.get("lm_loss", payload["loss"])
            desc = f"LM loss {loss:.4f}  lr {payload['lr']:.2e}"
            if payload.get("tokens_per_second"):
                desc += f"  {payload['tokens_per_second']:,.0f} tok/s (last step)"
            self.progress.update(self.task, completed=payload["step"], description=desc)
        elif kind == "final_pass":
            self.final_pass = True
        elif kind in ("eval", "valid", "test"):  # the loop logs validation as "eval"
            split = "test" if kind == "test" else "valid"
            # The final validation pass reads the next valid batches, so at a step that has
            # just evaluated it shows a second, different valid loss: say which one it is.
            note = " (final pass)" if self.final_pass and split == "valid" else ""
            self.console.log(f"{split} loss {payload['loss']:.4f} at step {payload['step']}{note}")
        elif kind == "checkpoint":
            self.console.log(f"checkpoint saved: {payload['path']}")
        elif kind == "phase":
            self.console.log(f"switched to the phase-{payload['phase']} blend at step {payload['step']}")
        elif kind == "warning":
            self.console.log(f"[yellow]warning[/]: {payload['message']}")
        elif kind == "stop":
            self.console.log(f"signal {payload.get('signal')} at step {payload['step']}: saved, stopping")
        elif kind == "end":
            self.progress.stop()


class PrepProgressView:
    """A `progress=` callback for `nemotron.data.prep.run_data_prep`: a bar over the work
    units, documents / tokens / throughput beside it, and one line per phase message."""

    def __init__(self, console: Console, show_bar: bool = True):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=not show_bar,
            transient=False,
        )
        self.task: TaskID | None = None
        self._message = ""
        self._tasks: dict[str, int] = {}

    def __call__(self, report: Any) -> None:
        if report.message and report.message != self._message:
            self._message = report.message
            self.console.log(report.message)
        if getattr(report, "warning", ""):
            self.console.log(f"[yellow]warning:[/] {report.warning}")
        tasks = getattr(report, "tasks", None) or {}
        if tasks and tasks != self._tasks:
            # Several tasks (nodes) share the prep: units done by each, when it changes.
            self._tasks = dict(tasks)
            self.console.log("units done per task: " + ", ".join(f"{k} {v}" for k, v in tasks.items()))
        if self.task is None and report.units_total:
            self.progress.start()
            self.task = self.progress.add_task("", total=report.units_total, phase=report.phase)
        if self.task is not None:
            self.progress.update(
                self.task,
                completed=report.units_done,
                phase=report.phase,
                description=f"{report.documents:,} docs  {report.tokens:,} tokens  "
                f"{report.tokens_per_s:,.0f} tok/s",
            )
        if report.phase == "done":
            self.stop()

    def stop(self) -> None:
        # A bar never started (the prep failed before planning) would still print an empty
        # line, ahead of the error line.
        if self.task is not None:
            self.progress.stop()
