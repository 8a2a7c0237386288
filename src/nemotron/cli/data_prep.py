"""`nemotron nano3 data prep pretrain`: tokenize a raw blend into Megatron bin/idx shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nemotron.cli import common
from nemotron.cli.common import (
    BatchOpt, ConfigOpt, DryRunOpt, JobDirOpt, OverridesArg, RunOpt, console,
)

STAGE = "data_prep"
STAGE_WORDS = ["nano3", "data", "prep", "pretrain"]

SampleOpt = Annotated[
    Optional[int],
    typer.Option("--sample", metavar="N", min=1, rich_help_panel=common.CONFIG_PANEL,
                 help="Read at most N rows per dataset (quick tests); same as sample=N."),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", rich_help_panel=common.CONFIG_PANEL,
                 help="Rebuild even if the output is complete; same as force=true."),
]


def _recipe_dir(cfg, config_path: Path) -> Path:
    """Where a relative `blend_path` resolves: the config file's directory, else the shipped
    data-prep recipe directory (so a copied or job-dir config can still name `data_blend_raw.json`)."""
    from nemotron.config import DataPrepJobConfig, recipe_config_dir

    own = config_path.parent.absolute()
    blend = Path(cfg.blend_path).expanduser()
    if blend.is_absolute() or (own / blend).exists():
        return own
    shipped = recipe_config_dir(DataPrepJobConfig)
    return shipped if (shipped / blend).exists() else own


def _blend_rows(cfg, recipe_dir: Path) -> list[tuple[str, str]]:
    from nemotron.data import embedded

    blend = Path(cfg.blend_path).expanduser()
    blend = blend if blend.is_absolute() else recipe_dir / blend
    rows = [("blend", str(blend))]
    try:
        datasets = json.loads(blend.read_text()).get("datasets", [])
        names = [f"{d.get('name')} ({d.get('path')}{':' + d['subset'] if d.get('subset') else ''}, "
                 f"w={d.get('weight')})" for d in datasets if isinstance(d, dict)]
        rows.append(("datasets", f"{len(names)}: " + "; ".join(names)))
    except (OSError, ValueError, AttributeError) as exc:
        rows.append(("datasets", f"unreadable blend: {exc}"))
    if embedded.uses_embedded(cfg, recipe_dir):
        rows.append(("embedded", f"corpus + tokenizer built from the Python standard library under "
                                 f"{embedded.default_cache_dir()} (no network)"))
    return rows


def data_prep_pretrain(
    overrides: OverridesArg = None,
    config: ConfigOpt = "default",
    run: RunOpt = None,
    batch: BatchOpt = None,
    dry_run: DryRunOpt = False,
    sample: SampleOpt = None,
    force: ForceOpt = False,
    job_dir: JobDirOpt = None,
) -> None:
    """Prepare pretraining data: tokenize the blend into train/valid/test shards + blend.json.

    Examples: [bold]nemotron nano3 data prep pretrain -c tiny[/] (embedded corpus, no network),
    [bold]nemotron nano3 data prep pretrain --sample 1000[/].
    """
    from nemotron.artifacts.jobdir import default_job_dir, finish_job_dir
    from nemotron.config import DataPrepJobConfig, dump_config, load_config, resolve_config_path
    from nemotron.data import embedded

    overrides = list(overrides or [])
    # The flags are overrides too (applied after the key=value tokens), recorded as such.
    if sample is not None:
        overrides.append(f"sample={sample}")
    if force:
        overrides.append("force=true")
    with common.user_errors():
        common.check_exclusive(run, batch)
        config_path = resolve_config_path(config, DataPrepJobConfig)
        cfg = load_config(config_path, overrides, DataPrepJobConfig)
        recipe_dir = _recipe_dir(cfg, config_path)
        target = (Path(job_dir) if job_dir is not None else default_job_dir(STAGE)).absolute()
        profile = run if run is not None else batch
        if profile is None:
            cfg = dataclasses.replace(cfg, output_dir=common.absolute(cfg.output_dir))
        elif not Path(cfg.blend_path).expanduser().is_absolute():
            # The job reads its config from its own directory, not the recipe's.
            cfg = dataclasses.replace(cfg, blend_path=str(recipe_dir / cfg.blend_path))
        config_yaml = dump_config(cfg)

        if profile is not None:
            common.submit_remote(
                stage=STAGE, profile=profile, attached=run is not None, config_yaml=config_yaml,
                job_dir=target, overrides=overrides, config_source=str(config_path),
                dry_run=dry_run,
            )
            return
        if dry_run:
            common.print_config(config_yaml, f"resolved config ({config_path})")
            rows = [
                ("stage", "data prep: nemotron.data.prep.run_data_prep(cfg, recipe_dir)"),
                ("where", "this machine, this process"
                          + (f", {cfg.num_workers} workers" if cfg.num_workers else ", every core")),
                ("command", common.reproduce_command(STAGE_WORDS, config, overrides)),
                ("config", str(config_path)),
                ("recipe dir", str(recipe_dir)),
                *_blend_rows(cfg, recipe_dir),
                ("tokenizer", f"{cfg.tokenizer.model} (bos {cfg.tokenizer.add_bos}, eos {cfg.tokenizer.add_eos})"),
                ("output", f"{cfg.output_dir}/{{train,valid,test}}/, blend.json "
                           f"({cfg.num_shards} train / {cfg.valid_shards} valid / {cfg.test_shards} test shards)"),
                ("sample", f"{cfg.sample} rows per dataset" if cfg.sample else "all rows"),
                ("job dir", str(target)),
            ]
            common.print_plan("plan (dry run: nothing written)", rows)
            return
        try:
            from nemotron.data.prep import run_data_prep
        except ImportError as exc:
            raise RuntimeError(f"data preparation is not available in this install: {exc}") from None
        target = common.open_job_dir(
            target, stage=STAGE, config_yaml=config_yaml, overrides=overrides,
            config_source=str(config_path),
        )
        if common.process_rank() == 0:
            console.print(f"[bold]job dir[/] {target}")

    def prepare():
        local = cfg
        if embedded.uses_embedded(cfg, recipe_dir):
            console.print("building the embedded corpus and tokenizer (cached after the first run)...")
            local = embedded.materialize_for_prep(cfg, recipe_dir, target)
        return run_data_prep(local, recipe_dir)

    result = common.run_stage(prepare, target)
    values = common.as_dict(result)
    if common.process_rank() == 0:
        finish_job_dir(target, "completed", values)
    rows = [(k.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else str(v))
            for k, v in values.items() if isinstance(v, (str, int, float, bool, Path)) or v is None]
    rows.extend(_split_totals(values.get("summary")))
    rows.append(("job dir", str(target)))
    if common.process_rank() == 0:
        common.print_plan("data prep finished", rows)


def _split_totals(summary) -> list[tuple[str, str]]:
    """Documents and tokens per split from DataPrepResult.summary (per dataset and split)."""
    if not isinstance(summary, list):
        return []
    totals: dict[str, list[int]] = {}
    for row in summary:
        if isinstance(row, dict) and {"split", "documents", "tokens"} <= set(row):
            docs_tokens = totals.setdefault(row["split"], [0, 0])
            docs_tokens[0] += row["documents"]
            docs_tokens[1] += row["tokens"]
    return [(split, f"{d:,} documents, {t:,} tokens") for split, (d, t) in totals.items()]


def register(nano3_app: typer.Typer) -> None:
    data_app = typer.Typer(help="Data preparation.", no_args_is_help=True)
    prep_app = typer.Typer(help="Tokenize raw datasets into Megatron bin/idx shards.", no_args_is_help=True)
    prep_app.command("pretrain")(data_prep_pretrain)
    data_app.add_typer(prep_app, name="prep")
    nano3_app.add_typer(data_app, name="data", rich_help_panel="Stages")
