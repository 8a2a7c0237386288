"""`nemotron nano3 data prep pretrain`: tokenize a raw blend into Megatron bin/idx shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nemotron.cli import common
from nemotron.cli.common import BatchOpt, ConfigOpt, DryRunOpt, JobDirOpt, RunOpt, console

STAGE = "data_prep"
STAGE_WORDS = ["nano3", "data", "prep", "pretrain"]

# Not common.OverridesArg: its example keys are the pretraining recipe's.
PrepOverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="[KEY=VALUE]...",
        show_default=False,
        help="Dotted data-prep overrides applied last, e.g. num_shards=8 tokenizer.add_bos=true "
        "output_dir=/data/prep.",
    ),
]
SampleOpt = Annotated[
    Optional[int],
    typer.Option(
        "--sample",
        metavar="N",
        min=1,
        rich_help_panel=common.CONFIG_PANEL,
        help="Read at most N rows per dataset (quick tests); same as sample=N.",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        rich_help_panel=common.CONFIG_PANEL,
        help="Rebuild even if the output is complete; same as force=true.",
    ),
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


def _blend_file(cfg, recipe_dir: Path) -> Path:
    """`blend_path`, a relative one against the recipe's directory."""
    blend = Path(cfg.blend_path).expanduser()
    return blend if blend.is_absolute() else recipe_dir / blend


def _check_blend(cfg, recipe_dir: Path, job_dir: Path) -> None:
    """A missing or invalid blend definition, or one whose directory source would hold the job
    directory, is refused naming the key, before the job dir is made (`load_blend` is the one
    validator; the prep reads the file again)."""
    from nemotron.config import ConfigError
    from nemotron.data.blend import BlendError, check_job_dir_apart, load_blend

    try:
        blend = load_blend(_blend_file(cfg, recipe_dir))
    except BlendError as exc:
        raise ConfigError(f"blend_path: {exc}") from None
    check_job_dir_apart(blend, recipe_dir, job_dir)


def _blend_rows(cfg, recipe_dir: Path) -> list[tuple[str, str]]:
    from nemotron.data import embedded

    blend = _blend_file(cfg, recipe_dir)
    rows = [("blend", str(blend))]
    try:
        datasets = json.loads(blend.read_text()).get("datasets", [])
        names = [
            f"{d.get('name')} ({d.get('path')}{':' + d['subset'] if d.get('subset') else ''}, "
            f"w={d.get('weight')})"
            for d in datasets
            if isinstance(d, dict)
        ]
        rows.append(("datasets", f"{len(names)}: " + "; ".join(names)))
    except (OSError, ValueError, AttributeError) as exc:
        rows.append(("datasets", f"unreadable blend: {exc}"))
    if embedded.uses_embedded(cfg, recipe_dir):
        rows.append(
            (
                "embedded",
                f"corpus + tokenizer built from the Python standard library under "
                f"{embedded.default_cache_dir()} (no network)",
            )
        )
    return rows


def sample_output_dir(cfg, overrides: list[str]):
    """A sample run (`--sample N` / `sample=N`) writes to `<output_dir>-sample<N>` unless
    `output_dir` is given on the command line: a quick look never replaces the full build."""
    if cfg.sample is None or any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        return cfg
    return dataclasses.replace(cfg, output_dir=f"{str(cfg.output_dir).rstrip('/')}-sample{cfg.sample}")


def slurm_task():
    """This process's task when a multi-task Slurm job step runs the prep (the launcher sets
    NEMOTRON_PREP_TASKS=slurm); None for a single process. RANK follows the task, so that
    only task 0 records the job."""
    import os

    from nemotron.data.config import PREP_TASKS_ENV

    if os.environ.get(PREP_TASKS_ENV) != "slurm":
        return None
    from nemotron.data.prep import PrepTask

    task = PrepTask.from_slurm(dict(os.environ))
    os.environ["RANK"] = str(task.rank)
    return task


def data_prep_pretrain(
    overrides: PrepOverridesArg = None,
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
    from nemotron.artifacts.jobdir import finish_job_dir
    from nemotron.config import (
        DataPrepJobConfig,
        dump_config,
        load_config,
        parse_override,
        resolve_config_path,
    )
    from nemotron.data import embedded

    overrides = list(overrides or [])
    with common.user_errors():
        common.check_exclusive(run, batch)
        # The flags are overrides too (applied after the key=value tokens), recorded as such;
        # a key=value token that says otherwise is a contradiction, not silently outvoted.
        flags = [("--sample", f"sample={sample}")] if sample is not None else []
        flags += [("--force", "force=true")] if force else []
        for flag, flag_token in flags:
            wanted = parse_override(flag_token)
            for token in overrides:
                ov = parse_override(token)
                if ov.key == wanted.key and ov.value != wanted.value:
                    shown = flag if wanted.value is True else f"{flag} {wanted.value}"
                    raise common.CliError(f"{shown} contradicts {token!r}")
            overrides.append(flag_token)
        config_path = resolve_config_path(config, DataPrepJobConfig)
        cfg = load_config(config_path, overrides, DataPrepJobConfig)
        cfg = sample_output_dir(cfg, overrides)
        recipe_dir = _recipe_dir(cfg, config_path)
        stage = common.StageRun.from_options(STAGE, job_dir, run, batch, overrides, config_path)
        target = stage.job_dir
        if stage.local:
            cfg = dataclasses.replace(cfg, output_dir=common.absolute(cfg.output_dir))
        elif not Path(cfg.blend_path).expanduser().is_absolute():
            # The job reads its config from its own directory, not the recipe's.
            cfg = dataclasses.replace(cfg, blend_path=str(recipe_dir / cfg.blend_path))
        config_yaml = dump_config(cfg)

        if not stage.local:
            stage.submit(config_yaml, dry_run)
            return
        if dry_run:
            common.print_config(config_yaml, f"resolved config ({config_path})")
            rows = [
                ("stage", "data prep: nemotron.data.prep.run_data_prep(cfg, recipe_dir)"),
                (
                    "where",
                    "this machine, this process"
                    + (f", {cfg.num_workers} workers" if cfg.num_workers else ", every core"),
                ),
                ("command", common.reproduce_command(STAGE_WORDS, config, overrides)),
                ("config", str(config_path)),
                ("recipe dir", str(recipe_dir)),
                *_blend_rows(cfg, recipe_dir),
                (
                    "tokenizer",
                    f"{cfg.tokenizer.model} (bos {cfg.tokenizer.add_bos}, eos {cfg.tokenizer.add_eos})",
                ),
                (
                    "output",
                    f"{cfg.output_dir}/{{train,valid,test}}/, blend.json "
                    f"({cfg.num_shards} train / {cfg.valid_shards} valid / {cfg.test_shards} test shards)",
                ),
                ("sample", f"{cfg.sample} rows per dataset" if cfg.sample else "all rows"),
                ("job dir", str(target)),
            ]
            common.print_plan("plan (dry run: nothing written)", rows)
            return
        try:
            from nemotron.data.prep import run_data_prep
        except ImportError as exc:
            raise RuntimeError(f"data preparation is not available in this install: {exc}") from None
        _check_blend(cfg, recipe_dir, target)
        task = slurm_task()
        use_wandb = cfg.wandb and cfg.wandb_mode != "disabled"
        if use_wandb:
            from nemotron.artifacts import wandb_lineage

            wandb_lineage.require_wandb()
        target = stage.open(config_yaml)

    from nemotron.cli.progress import PrepProgressView

    view = PrepProgressView(console)

    def prepare():
        local = cfg
        if embedded.uses_embedded(cfg, recipe_dir):
            if not embedded.is_materialized(embedded.prep_vocab_size(cfg)):
                console.print("building the embedded corpus and tokenizer (cached after the first run)...")
            local = embedded.materialize_for_prep(cfg, recipe_dir, target)
        try:
            result = run_data_prep(local, recipe_dir, progress=view, task=task, job_dir=target)
        finally:
            view.stop()
        if use_wandb and common.process_rank() == 0:
            logged = wandb_lineage.record_data_prep(
                result.blend_path,
                job_dir=target,
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                mode=cfg.wandb_mode,
                config=dataclasses.asdict(cfg),
            )
            note = (
                f"; upload it with: wandb sync {logged['run_dir']}"
                if cfg.wandb_mode == "offline" and logged["run_dir"]
                else ""
            )
            console.print(f"W&B ({cfg.wandb_mode}): logged {logged['artifact']}{note}", markup=False)
        return result

    result = common.run_stage(prepare, target)
    if task is not None and not task.leader:
        console.print(
            f"task {task.rank} of {task.world} on {task.host}: "
            f"{getattr(result, 'units_done_here', 0)} work units done"
        )
        return
    values = common.as_dict(result)
    if common.process_rank() == 0:
        finish_job_dir(target, "completed", values)
    rows = [
        (k.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else str(v))
        for k, v in values.items()
        if isinstance(v, (str, int, float, bool, Path)) or v is None
    ]
    rows.append(("job dir", str(target)))
    if common.process_rank() == 0:
        common.print_plan("data prep finished", rows)
        table = summary_table(values.get("summary"), values.get("bad_records"), values.get("bad_locations"))
        if table is not None:
            console.print(table)


def summary_table(summary, bad_records=None, bad_locations=None):
    """A Rich table of DataPrepResult.summary: one row per dataset and split (documents,
    tokens, share of the split's blend weight, shard files), split totals, bad records with
    where the first of each dataset's is (metadata.json lists the first few)."""
    from rich.table import Table

    rows = [
        r
        for r in summary or []
        if isinstance(r, dict) and {"dataset", "split", "documents", "tokens"} <= set(r)
    ]
    if not rows:
        return None
    table = Table(title="datasets", title_justify="left", caption_justify="left")
    for header, justify in (
        ("split", "left"),
        ("dataset", "left"),
        ("documents", "right"),
        ("tokens", "right"),
        ("share", "right"),
        ("files", "right"),
    ):
        table.add_column(header, justify=justify)
    bad = []
    for name, kinds in sorted((bad_records or {}).items()):
        if any(kinds.values()):
            text = f"{name}: " + ", ".join(
                f"{count:,} {kind}" for kind, count in sorted(kinds.items()) if count
            )
            first = (bad_locations or {}).get(name)
            bad.append(text + (f", the first at {first[0]}" if first else ""))
    if bad:
        table.caption = "bad records skipped: " + "; ".join(bad)
    totals: dict[str, list[int]] = {}
    for r in sorted(
        rows,
        key=lambda r: (
            ("train", "valid", "test").index(r["split"]) if r["split"] in ("train", "valid", "test") else 3,
            r["dataset"],
        ),
    ):
        table.add_row(
            r["split"],
            r["dataset"],
            f"{r['documents']:,}",
            f"{r['tokens']:,}",
            f"{r.get('share', 0.0):.1%}",
            str(r.get("files", "")),
        )
        docs_tokens = totals.setdefault(r["split"], [0, 0])
        docs_tokens[0] += r["documents"]
        docs_tokens[1] += r["tokens"]
    table.add_section()
    for split, (docs, tokens) in totals.items():
        table.add_row(split, "[bold]all[/]", f"{docs:,}", f"{tokens:,}", "100.0%", "")
    return table


def register(nano3_app: typer.Typer) -> None:
    data_app = typer.Typer(help="Data preparation.", no_args_is_help=True)
    prep_app = typer.Typer(help="Tokenize raw datasets into Megatron bin/idx shards.", no_args_is_help=True)
    prep_app.command("pretrain")(data_prep_pretrain)
    data_app.add_typer(prep_app, name="prep")
    nano3_app.add_typer(data_app, name="data", rich_help_panel="Stages")
