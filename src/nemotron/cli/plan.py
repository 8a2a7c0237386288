"""`nemotron nano3 plan`: memory per GPU and step time of a recipe's layout at several GPU
counts, the fastest layout that fits, and warnings about known-slow layouts
(`nemotron.train.perf_model`; docs/parallelism.md "Performance model")."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from nemotron.cli import common
from nemotron.cli.common import ConfigOpt, OverridesArg, console

DEFAULT_GPUS = (8, 64, 512, 1024)


def plan_rows(cfg, world: int) -> list[tuple[str, str]]:
    """`pretrain --dry-run` rows: the recipe's layout at `world` GPUs, its warnings and the
    fastest layout that fits."""
    from nemotron.train import perf_model as pm

    shape = pm.shape_from_config(cfg)
    layout = pm.layout_from_config(cfg, world)
    model = cfg.model.arch()
    rows = []
    try:
        plan = pm.estimate(model, layout, shape)
    except pm.PlanError as exc:
        return [("predicted", f"{world} GPUs: {exc}")]
    rows.append(
        (
            "predicted",
            f"{world} GPUs, {plan.layout.describe()} x{plan.grad_accumulation} "
            f"accumulation: {_memory_text(plan)}; {_speed_text(plan)}",
        )
    )
    for warning in plan.warnings:
        rows.append(("warning", warning))
    best = pm.recommend(model, world, shape)
    if best and best[0].layout != layout:
        b = best[0]
        rows.append(
            ("faster", f"{b.layout.describe()}: {_memory_text(b)}; {_speed_text(b)} ({_overrides(b.layout)})")
        )
    elif not best:
        rows.append(("faster", pm.no_layout_reason(model, world, shape)))
    return rows


def _memory_text(plan) -> str:
    m = plan.memory
    verdict = "fits" if m.fits else "DOES NOT FIT"
    return f"{m.total:.1f} GiB per GPU ({verdict} in {m.usable:.0f})"


def _speed_text(plan) -> str:
    return (
        f"{plan.step.total:.2f} s per step, {plan.tokens_per_second_per_gpu:,.0f} tokens/s "
        f"per GPU, MFU {plan.mfu:.3f}"
    )


def _overrides(layout) -> str:
    parts = [
        f"model.tensor_model_parallel_size={layout.tp}",
        f"model.expert_model_parallel_size={layout.ep}",
        f"model.context_parallel_size={layout.cp}",
        f"model.sequence_parallel={'true' if layout.tp > 1 else 'false'}",
        f"train.micro_batch_size={layout.micro_batch}",
        f"train.activation_recompute={'true' if layout.recompute else 'false'}",
    ]
    if not layout.accumulate_unsharded:
        parts.append("train.fsdp_accumulate_unsharded=false")
    # always: applied to a recipe with pipeline stages, a layout without must turn them off
    parts.append(f"model.pipeline_model_parallel_size={layout.pp}")
    if layout.pp > 1:
        parts.append(f"model.pipeline_schedule={layout.pipeline_schedule}")
        vpp = layout.virtual_stages
        parts.append(f"model.virtual_pipeline_model_parallel_size={'null' if vpp is None else vpp}")
        split = layout.blocks_per_stage
        parts.append(
            "model.pipeline_blocks_per_stage="
            + ("null" if split is None else "[" + ",".join(map(str, split)) + "]")
        )
    return " ".join(parts)


def _table(title: str, plans, *, show_overrides: bool = False):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    # the pipeline's idle time and sends, a column of its own only where a plan has stages
    pipelined = any(p.layout.pp > 1 for p in plans)
    for name, justify in (
        ("GPUs", "right"),
        ("layout", "left"),
        ("accum", "right"),
        ("weights+grads+Adam", "right"),
        ("FSDP bufs", "right"),
        ("activations", "right"),
        ("total GiB", "right"),
        ("fits", "left"),
        ("step s", "right"),
        ("compute", "right"),
        ("comm exposed", "right"),
        *((("PP bubble", "right"),) if pipelined else ()),
        ("tokens/s/GPU", "right"),
        ("MFU", "right"),
    ):
        table.add_column(name, justify="right" if justify == "right" else "left")
    if show_overrides:
        table.add_column("overrides", overflow="fold")
    for plan in plans:
        m, s = plan.memory, plan.step
        comm = s.fsdp + s.expert_parallel + s.tensor_parallel + s.context_parallel
        fits = ("yes" if m.fits else "[red]no[/]") + ("" if plan.implemented else " (refused)")
        row = [
            str(plan.layout.world),
            plan.layout.describe(),
            str(plan.grad_accumulation),
            f"{m.weights + m.gradients + m.optimizer:.1f}",
            f"{m.fsdp_buffers:.1f}",
            f"{m.activations + m.loss_buffers:.1f}",
            f"{m.total:.1f}",
            fits,
            f"{s.total:.2f}",
            f"{s.compute:.2f}",
            f"{comm:.2f}",
            *((f"{s.pipeline_bubble:.2f}",) if pipelined else ()),
            f"{plan.tokens_per_second_per_gpu:,.0f}",
            f"{plan.mfu:.3f}",
        ]
        if show_overrides:
            row.append(_overrides(plan.layout))
        table.add_row(*row)
    return table


def plan(
    overrides: OverridesArg = None,
    config: ConfigOpt = "default",
    gpus: Annotated[
        Optional[list[int]],
        typer.Option(
            "--gpus", "-g", metavar="N", help="GPU counts to plan for (repeat; default 8 64 512 1024)."
        ),
    ] = None,
    top: Annotated[
        int, typer.Option("--top", metavar="K", help="Fastest layouts that fit to show per GPU count.")
    ] = 3,
    include_pp: Annotated[
        bool,
        typer.Option(
            "--pp",
            help="Also consider pipeline parallelism (1F1B, stages split as training splits them: "
            "balanced by cost).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plans as JSON.")] = False,
) -> None:
    """Predict memory per GPU and step time of the recipe's layout at several GPU counts, and
    recommend the fastest layout that fits (calibrated on the measured H200 runs)."""
    from nemotron.config import PretrainConfig, load_config, resolve_config_path
    from nemotron.train import perf_model as pm

    with common.user_errors():
        bad_gpus = [n for n in gpus or [] if n < 1]
        if bad_gpus:
            raise common.CliError(f"--gpus must be a GPU count >= 1, got {bad_gpus[0]}")
        if top < 0:
            raise common.CliError(f"--top must be >= 0 (0: the recipe layout only), got {top}")
        cfg = load_config(resolve_config_path(config, PretrainConfig), list(overrides or []), PretrainConfig)
        model = cfg.model.arch()
        shape = pm.shape_from_config(cfg)
        counts = list(gpus or DEFAULT_GPUS)
        recipe, best, notes = [], [], []
        for world in counts:
            layout = pm.layout_from_config(cfg, world)
            try:
                recipe.append(pm.estimate(model, layout, shape))
            except pm.PlanError as exc:
                notes.append(f"{world} GPUs, recipe layout {layout.describe()}: {exc}")
            found = pm.recommend(model, world, shape, include_pp=include_pp)
            if not found:
                nothing = pm.no_layout_reason(model, world, shape, include_pp=include_pp)
                if nothing.startswith(pm.NOTHING_BUILDS) and not any(p.layout.world == world for p in recipe):
                    # not a plan but a GPU count nothing runs on: a bad --gpus value
                    raise common.CliError(f"--gpus {world}: {nothing}")
                notes.append(f"{world} GPUs: {nothing}")
            best.extend(found[:top])
    if as_json:
        import dataclasses
        import json

        def record(p, role):
            return {
                "role": role,
                **dataclasses.asdict(p),
                "memory_total_gib": p.memory.total,
                "memory_fits": p.memory.fits,
                "step_total_s": p.step.total,
                "overrides": _overrides(p.layout),
            }

        print(
            json.dumps(
                [record(p, "recipe") for p in recipe]
                + [record(p, "fastest") for p in best]
                + [{"note": n} for n in notes],
                indent=1,
            )
        )
        return
    console.print(
        f"[bold]{model.num_layers} blocks, {cfg.model.num_experts} experts, "
        f"global batch {shape.global_batch_size} x {shape.seq_length} tokens, "
        f"on {pm.H200.name}[/]"
    )
    # Piped or logged output has no terminal width: print the 13-column tables 200 columns wide
    # instead of Rich's 80-column default (which squeezes every cell to a few characters).
    tables = console if console.is_terminal else Console(width=200, highlight=False, soft_wrap=True)
    if recipe:
        tables.print(_table("recipe layout", recipe))
        seen = set()
        for p in recipe:
            for w in p.warnings:
                if w not in seen:
                    seen.add(w)
                    console.print(f"[yellow]warning:[/] {escape(w)}")
    if best:
        tables.print(_table(f"fastest layouts that fit (top {top} per GPU count)", best))
        for world in counts:
            first = next((p for p in best if p.layout.world == world), None)
            if first is not None:
                console.print(
                    f"recommended for {world} GPUs: {first.layout.describe()}: {_overrides(first.layout)}"
                )
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(
        "Calibrated on 2x/4x H200 runs within one node (docs/parallelism.md, "
        "'Performance model'); inter-node bandwidths are assumptions, not measurements."
    )


def register(nano3_app: typer.Typer) -> None:
    # the docstring's two lines would be listed with their line break in `nemotron nano3 -h`
    nano3_app.command(
        "plan",
        rich_help_panel="Stages",
        short_help="Predict memory per GPU and step time of the recipe's layout; recommend the fastest that fits.",
    )(plan)
