"""The `nemotron` command: `nemotron nano3 <stage> [options] [key=value ...]`.

Each command lives in its own module with a `register(nano3_app)` function; COMMAND_MODULES
lists them. A module that is not installed yet (another package's command still being built)
is skipped; one that fails to import for any other reason is an error.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

import nemotron

COMMAND_MODULES = (
    "nemotron.cli.data_prep",  # nano3 data prep pretrain
    "nemotron.cli.pretrain",  # nano3 pretrain
    "nemotron.cli.export",  # nano3 export hf / nano3 import hf
    "nemotron.cli.plot",  # nano3 plot
    "nemotron.cli.plan",  # nano3 plan
)

app = typer.Typer(
    name="nemotron",
    help="PyTorch-native Stage 0 pretraining for Nemotron 3 Nano (hybrid Mamba-2 / attention / MoE).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
nano3_app = typer.Typer(
    help="Nemotron 3 Nano recipes: data prep, pretraining, checkpoint conversion.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(nano3_app, name="nano3")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nemotron {nemotron.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """nemotron: open Stage 0 pretraining for Nemotron 3 Nano, from a laptop CPU to a GPU cluster."""


def register_commands(target: typer.Typer = nano3_app, modules=COMMAND_MODULES) -> list[str]:
    registered = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(target)
        registered.append(name)
    return registered


register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
