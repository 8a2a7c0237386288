"""`nemotron nano3 pretrain`: train on a recipe, locally (in this process) or through a profile."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import typer

from nemotron.cli import common
from nemotron.cli.common import BatchOpt, ConfigOpt, DryRunOpt, JobDirOpt, OverridesArg, RunOpt, console

STAGE = "pretrain"
STAGE_WORDS = ["nano3", "pretrain"]


RUNS_DIR = Path("runs")  # where job dirs go by default (`runs/<stage>/<time>-<id>`)


def main_run_checkpoint(runs_dir: Path = RUNS_DIR) -> Path | None:
    """The newest complete checkpoint of a main pretraining run: a job under
    `runs_dir/pretrain/` (newest first: job dir names sort by time) whose config trained from
    scratch (`checkpoint.finetune` false). None if there is none."""
    import yaml

    from nemotron.train.checkpoint import resolve_checkpoint

    for job in sorted((runs_dir / STAGE).glob("*"), reverse=True):
        try:
            ckpt = (yaml.safe_load((job / "config.yaml").read_text()) or {}).get("checkpoint") or {}
        except (OSError, yaml.YAMLError):
            continue
        if ckpt.get("finetune") or not ckpt.get("save"):
            continue
        found = resolve_checkpoint(ckpt["save"], must_exist=False)
        if found is not None:
            return found
    return None


def _finetune_source(ckpt, save: str, dry_run: bool) -> str | None:
    """`checkpoint.load` of a run that starts from another run's weights (`finetune`) and left
    `load` null: the main run's checkpoint (`main_run_checkpoint`), unless this run resumes
    from its own save dir. A real run without either stops here with one line."""
    if not ckpt.finetune or ckpt.load is not None:
        return common.absolute(ckpt.load)
    # imported only here: the other dry runs must not pay for torch (tests/cli/test_imports.py)
    from nemotron.config import ConfigError
    from nemotron.train.checkpoint import resolve_checkpoint

    if ckpt.auto_resume and resolve_checkpoint(save, must_exist=False) is not None:
        return None  # resumes this run; the weights it started from do not matter any more
    found = main_run_checkpoint()
    if found is None and not dry_run:
        raise ConfigError(
            f"checkpoint.load: null, and no main pretraining run with a checkpoint was found under "
            f"{(RUNS_DIR / STAGE).absolute()} (checkpoint.finetune=true starts from its weights); "
            "set checkpoint.load=<the main run's checkpoints dir>, or checkpoint.finetune=false "
            "to start from fresh weights"
        )
    return str(found) if found is not None else None


def _localize(cfg, job_dir: Path, dry_run: bool = False):
    """Absolute local paths, and the checkpoint defaults (`save: null` = <job dir>/checkpoints;
    `load: null` with `finetune` = the main run's checkpoint)."""
    ckpt = cfg.checkpoint
    data = cfg.data
    save = common.absolute(ckpt.save) if ckpt.save is not None else str(job_dir / "checkpoints")
    return dataclasses.replace(
        cfg,
        checkpoint=dataclasses.replace(ckpt, save=save, load=_finetune_source(ckpt, save, dry_run)),
        data=dataclasses.replace(
            data,
            blend=common.absolute(data.blend),
            phase2_blend=common.absolute(data.phase2_blend),
            cache_dir=common.absolute(data.cache_dir),
            mixed_length_blends=[
                dataclasses.replace(m, blend=common.absolute(m.blend)) for m in data.mixed_length_blends
            ],
        ),
    )


# The phase-2 blend may be prepared while phase 1 trains; until then the plan says so (and the
# run warns at its start: `TrainingData.open_datasets`).
PHASE2_MISSING = (
    "prepare it before the phase-2 switch, e.g. nemotron nano3 data prep pretrain "
    "-c phase2; otherwise the run saves a checkpoint at the switch and stops there"
)


def _check_checkpoint_load(cfg) -> None:
    """A `checkpoint.load` the run will read that holds no checkpoint (a typo in the path, a
    file, an empty dir) is refused here, naming the key, before a job dir is made; the library's
    `find_checkpoint` is the one home of the rule (sizes only here: the run verifies checksums).
    One process only: under torchrun `find_checkpoint` shares the work among the ranks, which
    the run's own check does."""
    ckpt = cfg.checkpoint
    if ckpt.load is None or common.launch_world_size() > 1:
        return
    from nemotron.config import ConfigError
    from nemotron.train.checkpoint import CheckpointError, find_checkpoint

    try:
        if (
            ckpt.finetune
            and ckpt.auto_resume
            and find_checkpoint(ckpt.save, checksums=False, must_exist=False)[0]
        ):
            return  # resumes its own save dir: `load` (the weights it started from) is not read
        find_checkpoint(ckpt.load, checksums=False)
    except CheckpointError as exc:
        raise ConfigError(f"checkpoint.load: {exc}") from None


def _check_job_dir(cfg, job_dir: Path) -> None:
    """A job dir inside a checkpoint, or under a name the save dir's checkpoints take, and a
    `checkpoint.save` that is a checkpoint, are refused before the job dir is made
    (`job_dir_problem`, `save_dir_problem`: a save replaced the job dir; the checkpoint read as
    damaged)."""
    from nemotron.config import ConfigError
    from nemotron.train.checkpoint import job_dir_problem, save_dir_problem

    problem = job_dir_problem(job_dir, cfg.checkpoint.save)
    if problem:
        raise common.CliError(f"--job-dir {job_dir}: {problem}; give the run another job dir")
    problem = save_dir_problem(cfg.checkpoint.save) if cfg.checkpoint.save else None
    if problem:
        raise ConfigError(problem)


def _plan_rows(
    cfg, job_dir: Path, config_arg: str, config_path: Path, overrides: list[str], where: str
) -> list[tuple[str, str]]:
    from nemotron.train.plan import mean_sample_length, phase2_start_step, plan_batches

    t = cfg.train
    mean_length = mean_sample_length(cfg.data, t.seq_length)
    tokens_per_step = round(t.global_batch_size * (mean_length or t.seq_length))
    if t.train_iters is not None:
        length = f"{t.train_iters:,} steps ({t.train_iters * tokens_per_step:,} tokens)"
    else:
        length = f"{t.train_tokens:,} tokens (~{-(-t.train_tokens // tokens_per_step):,} steps)"
    p = cfg.model.parallel()
    per_replica = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    layout_note = f"; {per_replica} rank{'s' * (per_replica != 1)} (GPUs) per model replica (TP*CP*PP)"
    pipeline_rows = []
    if p.pipeline_model_parallel_size > 1:
        from nemotron.distributed.pipeline_split import run_lengths, split_stages

        split = split_stages(cfg.model.arch(), p, run_lengths(t.seq_length, cfg.data))
        layout_note += f"; pipeline: {p.pipeline_schedule}, {split.num_stages} stages, split " + (
            "by model.pipeline_blocks_per_stage"
            if split.manual
            else "balanced by FLOPs at the run's sequence lengths"
        )
        pipeline_rows = [
            ("pipeline" if i == 0 else "", line) for i, line in enumerate(split.describe(cfg.model.arch()))
        ]
    blend = cfg.data.blend
    blend_note = (
        "" if cfg.data.mock or (blend and Path(blend).is_file()) else "  (missing: run data prep first)"
    )
    phase2 = cfg.data.phase2_blend
    run_plan = plan_batches(t, 1, cfg.data)  # the steps do not depend on data parallel
    steps, switch = run_plan.total_steps, phase2_start_step(run_plan, cfg.data)
    phase2_note = (
        "" if cfg.data.mock or not phase2 or Path(phase2).is_file() else (f"  (missing: {PHASE2_MISSING})")
    )
    return [
        ("stage", "pretrain: nemotron.train.pretrain(cfg, job_dir)"),
        ("where", where),
        ("command", common.reproduce_command(STAGE_WORDS, config_arg, overrides)),
        ("config", str(config_path)),
        (
            "model",
            f"{cfg.model.num_layers} blocks '{cfg.model.hybrid_pattern}', hidden {cfg.model.hidden_size}, "
            f"{cfg.model.num_experts} experts top-{cfg.model.moe_top_k}",
        ),
        (
            "parallel",
            f"TP{p.tensor_model_parallel_size} PP{p.pipeline_model_parallel_size} "
            f"EP{p.expert_model_parallel_size} CP{p.context_parallel_size} "
            f"SP {'on' if p.sequence_parallel else 'off'}; DP from world size" + layout_note,
        ),
        *pipeline_rows,
        ("length", length),
        (
            "batch",
            f"{t.global_batch_size} x {t.seq_length} tokens (micro-batch {t.micro_batch_size})"
            + "".join(
                f" mixed with {m.seq_length}-token samples (weight {m.weight:g} : "
                f"{cfg.data.blend_weight:g}) from {m.blend}"
                + ("" if cfg.data.mock or Path(m.blend).is_file() else " (missing)")
                for m in cfg.data.mixed_length_blends
            ),
        ),
        *(
            [("warning", f"the configured layout cannot run on any number of processes: {problem}")]
            if (problem := _layout_problem(cfg))
            else []
        ),
        ("device", f"{t.device}, {t.precision}"),
        ("data", "mock (synthetic tokens)" if cfg.data.mock else f"{blend}{blend_note}{_split_note(cfg)}"),
        # what the run refuses before its job dir (`_check_blend_files`)
        *[("warning", f"the run refuses {problem}") for problem in _blend_file_problems(cfg)],
        *[("warning", w) for w in _evaluation_warnings(cfg)],
        (
            "phase 2",
            f"{phase2} from {cfg.data.phase2_start_fraction:.0%} of tokens "
            + (
                f"(step {switch:,} of {steps:,})"
                if switch is not None and switch < steps
                else f"(never reached: step {switch:,} is past the run's {steps:,} steps)"
            )
            + phase2_note
            if phase2
            else "none",
        ),
        ("checkpoints", f"{cfg.checkpoint.save} every {cfg.checkpoint.save_interval} steps"),
        (
            "resume from",
            "weights only of the main run's checkpoint (finetune): none found under "
            f"{RUNS_DIR / STAGE}; set checkpoint.load"
            if cfg.checkpoint.finetune and not cfg.checkpoint.load
            else (
                f"weights only of {cfg.checkpoint.load} (finetune), unless the save dir "
                "holds a checkpoint of this run"
            )
            if cfg.checkpoint.finetune and cfg.checkpoint.load
            else cfg.checkpoint.load
            or (
                "the newest intact checkpoint in the save dir, if any"
                if cfg.checkpoint.auto_resume
                else "none"
            ),
        ),
        ("job dir", str(job_dir)),
        *_prediction_rows(cfg),
    ]


def _split_note(cfg) -> str:
    """The plan's word on data.split (Megatron's --split, which cuts a blend file of one blend
    for every split): the split string, or Megatron's default where such a file comes without
    one. (A split string with a per-split file is a warning row: `_blend_file_problems`.)"""
    split, blend = cfg.data.split, cfg.data.blend
    if split is None and blend and Path(blend).is_file():
        from nemotron.data.gpt_dataset import DEFAULT_SPLIT, GPTDatasetError, is_single_blend, load_blend

        with contextlib.suppress(GPTDatasetError):  # an unreadable file: a warning row says so
            if is_single_blend(load_blend(blend)):
                return f", split {DEFAULT_SPLIT!r} (Megatron's default; data.split sets it)"
    return "" if split is None else f", split {split!r}"


def _evaluation_warnings(cfg) -> list[str]:
    """The evaluation the blend leaves out though `train.eval_iters` asks for it (the run says
    the same at its start: `evaluation_warnings`, the one home of the rule)."""
    from nemotron.train.plan import evaluation_warnings

    return evaluation_warnings(cfg.data, cfg.train)


def _blend_file_problems(cfg) -> list[str]:
    """What the run would refuse in each blend file of it that exists, "key: why": unreadable,
    not of the form `data.split` needs (`check_split_string`, the one home of that rule), or a
    split the run reads that `read_blend` refuses (its entry malformed, a prefix without its
    .bin/.idx): the train split of every file, and the main blend's valid and test splits when
    the run evaluates and the file gives them a share. A phase-2 blend may still be missing at
    the start (docs/training.md "Phase curriculum")."""
    if cfg.data.mock:
        return []
    blends = [("data.blend", cfg.data.blend), ("data.phase2_blend", cfg.data.phase2_blend)]
    blends += [
        (f"data.mixed_length_blends[{i}].blend", m.blend) for i, m in enumerate(cfg.data.mixed_length_blends)
    ]
    present = [(key, path) for key, path in blends if path and Path(path).is_file()]
    if not present:
        return []
    from nemotron.data.gpt_dataset import GPTDatasetError, check_split_string, read_blend, split_has_share

    problems = []
    for key, path in present:
        splits = ["train"]
        if key == "data.blend" and cfg.train.eval_iters:
            splits += [s for s in ("valid", "test") if split_has_share(path, s, cfg.data.split)]
        try:
            check_split_string(path, cfg.data.split)
            for split in splits:
                read_blend(path, split)
        except GPTDatasetError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def _check_blend_files(cfg) -> None:
    """`_blend_file_problems` before a job dir is made (the run reads the files again)."""
    problems = _blend_file_problems(cfg)
    if problems:
        from nemotron.config import ConfigError

        raise ConfigError(problems[0])


def check_layout(cfg, world: int, where: str) -> None:
    """The checks the job runs at its start on `world` processes, done before submitting it:
    the parallel sizes against the world size and the model, the batch against data parallel,
    every sample length against 2*CP*TP (`ParallelDims`, the one home of these rules, with the
    pipeline split), which `pretrain` otherwise refused only after the job dir was made (under
    `--run`, after the submission). One process trains the whole model and ignores the
    configured layout, so it is not checked."""
    if world <= 1:
        return
    from nemotron.config import ConfigError
    from nemotron.distributed.parallel_dims import ParallelDims, ParallelLayoutError

    t = cfg.train
    try:
        arch = cfg.model.arch()
        dims = ParallelDims.from_config(cfg.model.parallel(), world, arch)
        dims.validate_batch(t.global_batch_size, t.micro_batch_size, _sample_lengths(cfg), arch)
    except ParallelLayoutError as exc:
        raise ConfigError(f"{where}: {world} processes: {exc}") from None


def _sample_lengths(cfg) -> dict[str, int]:
    """Every sample length of the run, by the key that sets it."""
    from nemotron.distributed.parallel_dims import sample_lengths

    return sample_lengths(cfg.train.seq_length, [m.seq_length for m in cfg.data.mixed_length_blends])


def _layout_problem(cfg) -> str | None:
    """Why the configured model-parallel layout can run on no number of processes (sizes
    against the model, sample lengths against 2*CP*TP), or None. Checked at the fewest
    processes the sizes need; the batch is left out (it depends on the data-parallel size)."""
    from nemotron.distributed.parallel_dims import (
        ParallelDims,
        ParallelLayoutError,
        check_sequence_lengths,
        context_halo,
        sequence_shards_how,
    )
    from nemotron.train import perf_model as pm

    p = cfg.model.parallel()
    sizes = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.expert_model_parallel_size,
        p.context_parallel_size,
    )
    if sizes == (1, 1, 1, 1):
        return None
    try:
        arch = cfg.model.arch()
        dims = ParallelDims.from_config(p, pm.smallest_world(pm.layout_from_config(cfg, 1)), arch)
        check_sequence_lengths(
            _sample_lengths(cfg),
            dims.sequence_shards,
            sequence_shards_how(dims.tp, dims.cp),
            cp=dims.cp,
            halo=context_halo(arch),
        )
    except ParallelLayoutError as exc:
        return str(exc)
    return None


def _prediction_rows(cfg, world: int | None = None) -> list[tuple[str, str]]:
    """Memory and speed the performance model predicts for a GPU run (docs/parallelism.md
    "Performance model") at `world` GPUs (a profile's nodes x processes), else torchrun's
    WORLD_SIZE, else the fewest GPUs the layout needs."""
    import os

    if cfg.train.device == "cpu":
        return []
    from nemotron.cli.plan import plan_rows
    from nemotron.train import perf_model as pm

    if not world or world <= 1:
        world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if world <= 1:
        world = pm.smallest_world(pm.layout_from_config(cfg, 1))
    return plan_rows(cfg, world)


def _summary_rows(summary) -> list[tuple[str, str]]:
    values = common.as_dict(summary)
    rows = []
    for label, keys in (
        ("steps", ("steps", "step", "iteration", "iterations")),
        ("tokens", ("tokens", "consumed_tokens", "tokens_seen")),
        # The progress bar shows the same two figures, labelled the same way.
        ("final LM loss (last step)", ("final_loss", "loss", "last_loss")),
        ("tokens/s (run average)", ("tokens_per_second",)),
        ("checkpoint", ("checkpoint", "checkpoint_path", "last_checkpoint", "checkpoint_dir")),
    ):
        values.pop("status", None)
        for key in keys:
            if values.get(key) is not None:
                value = values.pop(key)
                if key == "tokens_per_second":
                    value = f"{value:,.0f}"
                elif isinstance(value, float):
                    value = f"{value:.4f}"
                elif isinstance(value, int):
                    value = f"{value:,}"
                rows.append((label, str(value)))
                break
    for key, value in values.items():
        if isinstance(value, float):
            rows.append((key.replace("_", " "), f"{value:.4g}"))
        elif isinstance(value, (str, int, bool)):  # None (not resumed, no problem, ...): no row
            rows.append((key.replace("_", " "), str(value)))
    return rows


def _entry_point():
    """`nemotron.train.pretrain(cfg, job_dir) -> TrainSummary`, the training library's entry."""
    try:
        from nemotron.train import pretrain as entry
    except ImportError as exc:
        raise RuntimeError(f"training is not available in this install: {exc}") from None
    if not callable(entry):  # a submodule named `pretrain`: take its function
        entry = getattr(entry, "pretrain")
    return entry


def pretrain(
    overrides: OverridesArg = None,
    config: ConfigOpt = "default",
    run: RunOpt = None,
    batch: BatchOpt = None,
    dry_run: DryRunOpt = False,
    job_dir: JobDirOpt = None,
) -> None:
    """Pretrain Nemotron 3 Nano (or a smaller relative) on a prepared data blend.

    Examples: [bold]nemotron nano3 pretrain -c tiny[/] (CPU, minutes),
    [bold]nemotron nano3 pretrain train.train_iters=5000 checkpoint.save=/ckpt[/].
    """
    with contextlib.ExitStack() as process_group:
        _pretrain(process_group, list(overrides or []), config, run, batch, dry_run, job_dir)


def _pretrain(
    process_group: contextlib.ExitStack,
    overrides: list[str],
    config: str,
    run: str | None,
    batch: str | None,
    dry_run: bool,
    job_dir: Path | None,
) -> None:
    from nemotron.artifacts.jobdir import finish_job_dir
    from nemotron.config import PretrainConfig, dump_config, load_config, resolve_config_path

    with common.user_errors():
        common.check_exclusive(run, batch)
        config_path = resolve_config_path(config, PretrainConfig)
        cfg = load_config(config_path, overrides, PretrainConfig)
        if run is None and batch is None and not dry_run:
            # torchrun: join the launch's process group now (until the command ends), so that
            # rank 0 names the default job dir for every rank
            process_group.enter_context(common.launch_process_group(cfg.train.device))
        stage = common.StageRun.from_options(STAGE, job_dir, run, batch, overrides, config_path)
        target = stage.job_dir
        if stage.local:
            cfg = _localize(cfg, target, dry_run)
        config_yaml = dump_config(cfg)

        if not stage.local:
            stage.submit(
                config_yaml,
                dry_run,
                predict=lambda world: _prediction_rows(cfg, world),
                check=lambda world, where: check_layout(cfg, world, where),
            )
            return
        if common.launch_world_size() > 1:
            # under torchrun: what the job checks at its start, before a job dir is made
            check_layout(cfg, common.launch_world_size(), "this launch (torchrun WORLD_SIZE)")
        if dry_run:
            common.print_config(config_yaml, f"resolved config ({config_path})")
            common.print_plan(
                "plan (dry run: nothing written)",
                _plan_rows(cfg, target, config, config_path, overrides, "this machine, this process"),
            )
            return
        if not cfg.data.mock and (cfg.data.blend is None or not Path(cfg.data.blend).is_file()):
            raise FileNotFoundError(
                f"data.blend: {cfg.data.blend} does not exist; prepare it first "
                f"(nemotron nano3 data prep pretrain -c {config}) or set data.blend=PATH"
            )
        _check_blend_files(cfg)
        _check_checkpoint_load(cfg)
        _check_job_dir(cfg, target)
        run_pretrain = _entry_point()
        target = stage.open(config_yaml)

    on_event = None
    if common.process_rank() == 0:
        from nemotron.cli.progress import TrainProgress

        on_event = TrainProgress(console, show_bar=cfg.logger.progress_bar)
    summary = common.run_stage(lambda: run_pretrain(cfg, target, on_event=on_event), target)
    if on_event is not None:
        on_event.progress.stop()
    rows = _summary_rows(summary)
    status = getattr(summary, "status", None) or "completed"
    if common.process_rank() == 0:
        finish_job_dir(target, status, common.as_dict(summary))
    rows.append(("job dir", str(target)))
    if common.process_rank() == 0:
        common.print_plan(f"pretrain {status}", rows)
    if status != "completed":
        # stopped by a signal (resumable from the last checkpoint, but not finished), or
        # finished with more skipped steps than train.max_skipped_steps allows
        ckpt = getattr(summary, "checkpoint", None)
        problem = getattr(summary, "problem", None)
        text = f"pretrain {status} after {getattr(summary, 'steps', '?')} steps"
        text += f": {problem}" if problem else ""
        if status == "interrupted" and ckpt:
            text += f"; {_how_to_resume(cfg, ckpt)}"
        if common.process_rank() != 0:  # every rank has this summary: rank 0 says it, once
            raise typer.Exit(1)
        raise common.fail(text, 1)


def _how_to_resume(cfg, checkpoint: str) -> str:
    """What resumes an interrupted run from `checkpoint`: the same command when it resumes its
    save dir (no `checkpoint.load`, finetune, or a load naming the save dir), else a load of
    the save dir (a load naming one checkpoint starts there again at every rerun)."""
    ckpt = cfg.checkpoint
    save = Path(ckpt.save).resolve() if ckpt.save else None
    if ckpt.auto_resume and (ckpt.load is None or ckpt.finetune or Path(ckpt.load).resolve() == save):
        return f"rerun the same command to resume from {checkpoint}"
    return f"resume with checkpoint.load={ckpt.save if save is not None else checkpoint}"


def register(nano3_app: typer.Typer) -> None:
    nano3_app.command("pretrain", rich_help_panel="Stages")(pretrain)
