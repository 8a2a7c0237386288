"""`nemotron nano3 export hf CKPT OUT` and `nemotron nano3 import hf DIR OUT`: checkpoints to and
from a Hugging Face transformers `NemotronHForCausalLM` directory."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from nemotron.cli.common import CliError, console, user_errors

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _check_apart(source: Path, out: Path, source_name: str) -> None:
    """OUT must not be, hold or lie inside the source: `--overwrite` replaces OUT whole (the
    source, or the run holding it, would be deleted), and files written inside a checkpoint
    become part of it."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        where = "is" if dst == src else ("holds" if dst in src.parents else "is inside")
        raise CliError(f"OUT {out} {where} {source_name} {source}: write the result somewhere else")


def _check_out_free(out: Path, overwrite: bool, earlier_output: Callable[[Path], str | None]) -> None:
    """OUT already holding something, or with a file on its path, is refused before the
    checkpoint is read and converted (minutes for a full model), saying how to replace it:
    `--overwrite` where OUT is an earlier output (`earlier_output`), by hand otherwise."""
    from nemotron.utils.fs import NotEarlierOutput, refuse_non_empty

    try:
        refuse_non_empty(out, overwrite, earlier_output)
    except NotEarlierOutput as exc:
        raise CliError(f"OUT {exc}: not replaced; write somewhere else, or empty it first") from None
    except (FileExistsError, NotADirectoryError) as exc:
        if not out.is_dir():
            hint = "write somewhere else"
        elif (instead := earlier_output(out)) is not None:
            hint = f"it {instead}; write somewhere else, or empty it first"
        else:
            hint = "pass --overwrite to replace it, or write somewhere else"
        raise CliError(f"OUT {exc}: {hint}") from None


def _export_hf(
    checkpoint: Annotated[
        Path,
        typer.Argument(metavar="CKPT", help="A training checkpoint (iter_N dir) or a save dir (its latest)."),
    ],
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Directory to write (config.json, safetensors, tokenizer, generation_config.json).",
        ),
    ],
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weight dtype on disk: bf16 | fp32 | fp16 (router stays fp32).")
    ] = "bf16",
    max_shard_gb: Annotated[
        float, typer.Option("--max-shard-gb", help="Largest safetensors file, in GiB.")
    ] = 5.0,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace OUT if it is an earlier export (a NemotronH config.json)."),
    ] = False,
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            "--tokenizer",
            metavar="DIR|FILE|HUB_ID",
            help="Tokenizer to include (default: the one the checkpoint's training data was tokenized with, from its lineage manifest).",
        ),
    ] = None,
    no_tokenizer: Annotated[
        bool,
        typer.Option(
            "--no-tokenizer", help="Write weights and config only (AutoTokenizer will not load OUT)."
        ),
    ] = False,
) -> None:
    """Write a transformers NemotronHForCausalLM directory (weights, tokenizer, generation config)
    from a nemotron checkpoint: AutoTokenizer and AutoModelForCausalLM load it on their own."""
    with user_errors():
        import torch

        from nemotron.models.nano3.hf_export import export_hf

        if dtype not in DTYPES:
            raise CliError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not (math.isfinite(max_shard_gb) and max_shard_gb > 0):
            raise CliError(f"--max-shard-gb must be a positive number of GiB, got {max_shard_gb}")
        from nemotron.models.nano3.hf import not_an_export

        _check_apart(checkpoint, out, "CKPT")
        _check_out_free(out, overwrite, not_an_export)
        if tokenizer is not None and no_tokenizer:
            raise CliError("--tokenizer and --no-tokenizer are mutually exclusive")
        result = export_hf(
            checkpoint,
            out,
            dtype=getattr(torch, DTYPES[dtype]),
            max_shard_bytes=int(max_shard_gb * 1024**3),
            overwrite=overwrite,
            tokenizer=tokenizer,
            with_tokenizer=not no_tokenizer,
        )
        for skipped in result.skipped:
            console.print(f"warning: skipped damaged checkpoint {skipped}", markup=False)
        with_what = f"tokenizer {result.tokenizer}" if result.tokenizer else "no tokenizer"
        console.print(
            f"exported {result.checkpoint} -> {result.out} ({dtype}, NemotronHForCausalLM, {with_what})",
            markup=False,
        )


def _import_hf(
    hf_dir: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="A NemotronHForCausalLM directory (config.json + safetensors)."),
    ],
    out: Annotated[
        Path,
        typer.Argument(metavar="OUT", help="Model-only checkpoint directory to write (DCP + config.json)."),
    ],
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace OUT if it is an earlier model checkpoint (import hf's)."),
    ] = False,
) -> None:
    """Read a transformers NemotronH directory into a nemotron model checkpoint (float32)."""
    with user_errors():
        from nemotron.models.nano3.checkpoint import not_a_model_checkpoint, save_model_checkpoint
        from nemotron.models.nano3.hf import load_hf

        _check_apart(hf_dir, out, "DIR")
        _check_out_free(out, overwrite, not_a_model_checkpoint)
        model = load_hf(hf_dir)
        written = save_model_checkpoint(model, model.config, out, overwrite=overwrite)
        console.print(f"imported {hf_dir} -> {written} (model weights, float32)", markup=False)


def register(nano3_app: typer.Typer) -> None:
    export_app = typer.Typer(help="Export a checkpoint to another format.", no_args_is_help=True)
    export_app.command("hf")(_export_hf)
    import_app = typer.Typer(help="Import a checkpoint from another format.", no_args_is_help=True)
    import_app.command("hf")(_import_hf)
    nano3_app.add_typer(export_app, name="export", rich_help_panel="Conversion")
    nano3_app.add_typer(import_app, name="import", rich_help_panel="Conversion")
