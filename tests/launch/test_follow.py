"""Following an attached job: Ctrl-C and SIGTERM cancel it, wherever they land."""

from __future__ import annotations

import importlib
import signal
import threading
from types import SimpleNamespace

import pytest

# (the package exports the function `submit` under the module's name)
submit_module = importlib.import_module("nemotron.launch.submit")


class _SwallowingRunner:
    """Reads the job's state as NeMo-Run's Slurm scheduler does, through invoke, which catches a
    KeyboardInterrupt raised while its command (sacct) runs: it forwards ^C to the command and
    waits on (`invoke.runners.Runner._run_body`). The job runs until cancelled."""

    def __init__(self, signum: int, at_poll: int):
        self.signum, self.at_poll = signum, at_poll
        self.polls, self.cancelled = 0, []

    def status(self, handle):
        if threading.current_thread() is not threading.main_thread():
            return None  # the log streamer: the job has not started for it
        self.polls += 1
        if self.polls == self.at_poll:
            try:
                signal.raise_signal(self.signum)
            except KeyboardInterrupt:
                pass  # invoke's handling
        if self.polls > 50:
            raise AssertionError("the interrupt was lost: the job is still being followed")
        return SimpleNamespace(is_terminal=lambda: False, state=SimpleNamespace(name="RUNNING"))

    def cancel(self, handle):
        self.cancelled.append(handle)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_swallowed_while_the_state_is_read_still_cancels_the_job(monkeypatch, signum):
    """Ctrl-C landing while sacct ran was caught by invoke and lost: `nemotron ... --run
    --attach` went on following the job to its end (in CI, the interrupt test waited out its
    60 s). The handler notes the signal; the next look at it cancels the job and re-raises."""
    monkeypatch.setattr(submit_module, "_POLL_SECONDS", 0.01)
    runner = _SwallowingRunner(signum, at_poll=3)
    exp = SimpleNamespace(_runner=runner)
    plan = SimpleNamespace(task_name="pretrain", remote_task_dir="/jobs/x")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        submit_module._follow(exp, "slurm://job/42", plan, lambda line: None)
    assert runner.polls == 3 and runner.cancelled == ["slurm://job/42"]
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers given back


def test_an_interrupt_between_reads_cancels_the_job(monkeypatch):
    """The plain case: the signal lands in the sleep between two reads."""
    monkeypatch.setattr(submit_module, "_POLL_SECONDS", 0.01)

    class Runner(_SwallowingRunner):
        def status(self, handle):
            if threading.current_thread() is threading.main_thread():
                self.polls += 1
                if self.polls == 2:
                    signal.raise_signal(signal.SIGINT)  # not caught: raises out of status
            return SimpleNamespace(is_terminal=lambda: False, state=SimpleNamespace(name="RUNNING"))

    runner = Runner(signal.SIGINT, at_poll=0)
    with pytest.raises(KeyboardInterrupt):
        submit_module._follow(
            SimpleNamespace(_runner=runner),
            "slurm://job/7",
            SimpleNamespace(task_name="t", remote_task_dir="/j"),
            lambda line: None,
        )
    assert runner.cancelled == ["slurm://job/7"]
