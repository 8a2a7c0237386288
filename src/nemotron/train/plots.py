"""Training curves from a job dir's metrics.jsonl, drawn to PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from nemotron.train.metrics import METRICS_FILE, MetricsFileError, read_metrics
from nemotron.utils.fs import atomic_path, blocking_file


def _series(records, kind: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if r.get("kind") == kind and isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(r["step"])
            values.append(float(value))
    return steps, values


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

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(records, "train", "lm_loss"), label="train (cross-entropy)", lw=1)
    for kind, marker in (("eval", "o"), ("test", "s")):
        steps, values = _series(records, kind, "loss")
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
    ax.plot(*_series(records, "train", "lr"), lw=1)
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
    return written
