"""The default run leaves out the tests marked `slow` (multi-rank layouts, spawned loader workers,
real-time waits: about a third of the suite's time on 2 cores), so that it stays under ~15 minutes;
CI runs them in a stage of their own (`pytest -m slow`). `--slow` adds them to any run, and naming
a test file or a test on the command line runs it whole.

A session that will launch ranks (`distributed/_spawn.py`) starts their forkserver first, whatever
order the tests run in."""

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (CI: `pytest -m slow`)"
    )


def _names_files_or_tests(config: pytest.Config) -> bool:
    return any("::" in arg or Path(arg).is_file() for arg in config.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or config.option.markexpr or _names_files_or_tests(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_collection_finish(session: pytest.Session) -> None:
    launches_ranks = any(
        hasattr(getattr(item, "module", None), name)
        for item in session.items
        for name in ("run_distributed", "_launch")
    )
    if launches_ranks and not session.config.option.collectonly:
        from distributed._spawn import start_forkserver  # imports torch: only for such sessions

        start_forkserver()
