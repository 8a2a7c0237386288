"""`nemotron nano3 plot RUN_DIR`: loss, learning-rate and balance curves of a run, as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nemotron.cli import common
from nemotron.cli.common import console


def plot(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Job dir of a pretraining run (holds metrics.jsonl).")
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", metavar="DIR", help="Where to write the PNGs (default: RUN_DIR/plots)."),
    ] = None,
) -> None:
    """Draw a run's loss, learning-rate and expert-balance curves to PNG files."""
    from nemotron.train.plots import plot_run

    with common.user_errors():
        paths = plot_run(run_dir, out, on_warning=lambda message: typer.echo(f"warning: {message}", err=True))
    for path in paths:
        console.print(f"wrote {path}", markup=False)


def register(nano3_app: typer.Typer) -> None:
    nano3_app.command("plot", rich_help_panel="Runs")(plot)
