"""Training curves from a job dir's metrics.jsonl, drawn to PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from nemotron.train.metrics import METRICS_FILE, MetricsFileError, read_metrics
from nemotron.utils.fs import atomic_path, blocking_file

# how the metrics logger writes a non-finite float (JSON has none): `metrics._clean`
_NON_FINITE = {"nan", "inf", "-inf"}


def _series(records, kind: str, key: str, non_finite: dict | None = None) -> tuple[list[int], list[float]]:
    """The (step, value) pairs of `key` in the records of `kind`. A non-finite value (a diverged
    step's loss) is drawn as a gap, NaN, rather than left out (its neighbours would be joined
    across it, hiding it); its steps are added to `non_finite[(kind, key)]` for a warning."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if r.get("kind") != kind:
            continue
        if isinstance(value, str) and value in _NON_FINITE:
            value = float("nan")
            if non_finite is not None:
                non_finite.setdefault((kind, key), []).append(r["step"])
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(r["step"])
            values.append(float(value))
    return steps, values


def _steps_text(steps: list[int], shown: int = 5) -> str:
    text = ", ".join(str(s) for s in steps[:shown])
    return text + (f" and {len(steps) - shown} more" if len(steps) > shown else "")


def plot_run(
    run_dir: str | Path, out_dir: str | Path | None = None, on_warning: Callable[[str], None] | None = None
) -> list[Path]:
    """Write loss.png, lr.png and balance.png (when the run logged balance) for a job dir.

    Returns the written paths. Raises FileNotFoundError when the dir has no metrics.jsonl and
    MetricsFileError when it holds no training records yet, a record is not readable (see
    `read_metrics`, which also says what `on_warning` is told) or a value cannot be drawn.
    """
    # ~2.7 s to import on the 2-core CI machine: only `nemotron nano3 plot` pays for it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir, on_warning)
    if not any(r.get("kind") == "train" for r in records):
        raise MetricsFileError(f"{run_dir / METRICS_FILE} has no training records yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    blocker = blocking_file(out)
    if blocker is not None:
        raise NotADirectoryError(
            f"{out}: {blocker} is a file, not a directory: the plots cannot be written there"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        except (ValueError, OverflowError) as e:  # matplotlib's axis on a value near float's limit
            raise MetricsFileError(
                f"{run_dir / METRICS_FILE}: its values cannot be drawn as {name} ({e}); a record holds "
                f"a number no run logs"
            ) from None
        finally:
            plt.close(fig)
        written.append(path)

    non_finite: dict[tuple[str, str], list[int]] = {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(records, "train", "lm_loss", non_finite), label="train (cross-entropy)", lw=1)
    for kind, marker in (("eval", "o"), ("test", "s")):
        steps, values = _series(records, kind, "loss", non_finite)
        if steps:
            ax.plot(steps, values, marker=marker, ls="-" if kind == "eval" else "", label=kind)
    entropy = _series(records, "run", "unigram_entropy")[1]
    if entropy:
        ax.axhline(entropy[-1], color="grey", lw=0.8, ls="--", label="unigram entropy of the data")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(*_series(records, "train", "lr", non_finite), lw=1)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    worst = _series(records, "train", "balance/max_over_mean")
    if worst[0]:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        top.plot(*worst, lw=1, label="worst layer")
        top.plot(*_series(records, "train", "balance/mean_max_over_mean"), lw=1, label="layer mean")
        top.axhline(1.0, color="grey", lw=0.8, ls="--")
        top.set(ylabel="max / mean expert load", title="MoE load balance")
        top.legend()
        top.grid(alpha=0.3)
        bottom.plot(*_series(records, "train", "balance/bias_range"), lw=1)
        bottom.set(xlabel="step", ylabel="expert bias range")
        bottom.grid(alpha=0.3)
        save(fig, "balance.png")
    if on_warning is not None:
        for (kind, key), steps in non_finite.items():
            on_warning(
                f"{run_dir / METRICS_FILE}: {kind} {key} is not a finite number at step(s) "
                f"{_steps_text(steps)}; drawn as gaps"
            )
    return written
