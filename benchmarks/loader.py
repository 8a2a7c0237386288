"""Training-loader cost: time to produce one micro-batch of seq 8192 from a prepared blend.

The blend: 4 datasets (weights 0.4 / 0.3 / 0.2 / 0.1) cut from the embedded corpora
(`nemotron.data.embedded`: the installed Python standard library's sources and docstrings) and
prepared by the project's own data prep (`run_data_prep`, the embedded 4096-token BPE, EOS
appended) into Megatron shards + blend.json. The training loader (`nemotron.train.data`,
Megatron GPT sample semantics, blended) then serves micro-batches of 1 and 2 samples of 8192
tokens, as `pretrain` asks for them:

  index build   the one-off cost of building (then caching) the sample/shuffle/blend indices
  synchronous   data.num_workers=0: the loop waits for every micro-batch (read + collate)
  workers       data.num_workers=N: the loop runs a simulated GPU step (sleep --step-s) between
                steps and waits only for what the background workers have not prepared yet

Each micro-batch time is also given as a fraction of one GPU step of the Nano3 proxy on one
H200 (--gpu-step-s, default 0.5 s: the low end of the 0.5-1 s per step expected for it, so the
fraction is an upper bound; see docs/benchmarks.md).

    .venv/bin/python benchmarks/loader.py --workdir /tmp/loaderbench
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

WEIGHTS = (0.4, 0.3, 0.2, 0.1)
SEQ = 8192


def prepare_blend(workdir: Path) -> Path:
    """Generate the 4-dataset corpus and run data prep on it (cached in workdir)."""
    from nemotron.data import embedded
    from nemotron.data.config import DataPrepConfig, TokenizerConfig
    from nemotron.data.prep import run_data_prep

    assets = embedded.materialize(cache_dir=workdir / "embedded")
    raw = workdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    datasets = []
    for name, corpus in assets.corpora.items():
        lines = corpus.read_text().splitlines()
        for part in range(2):  # each corpus gives two datasets (even / odd documents)
            path = raw / f"{name}-{part}.jsonl"
            if not path.is_file():
                path.write_text("\n".join(lines[part::2]) + "\n")
            datasets.append({"name": f"{name}-{part}", "path": str(path), "text_field": "text"})
    for dataset, weight in zip(datasets, WEIGHTS):
        dataset["weight"] = weight
    blend_raw = workdir / "data_blend_raw.json"
    blend_raw.write_text(json.dumps({"datasets": datasets}, indent=2))
    cfg = DataPrepConfig(
        blend_path=str(blend_raw),
        output_dir=str(workdir / "prepared"),
        tokenizer=TokenizerConfig(model=str(assets.tokenizer), kind="huggingface"),
        num_shards=2,
        valid_fraction=0.01,
        test_fraction=0.01,
    )
    result = run_data_prep(cfg)
    print(
        f"data prep: {result.totals('train')[1]:,} train tokens in {len(datasets)} datasets "
        f"({'cached' if result.cached else f'{result.elapsed_s:.1f} s'})"
    )
    return result.blend_path


def loader(blend: Path, cache: Path, micro: int, steps: int, workers: int):
    from nemotron.data.config import DataConfig
    from nemotron.train.config import TrainConfig
    from nemotron.train.data import TrainingData, plan_batches

    train = TrainConfig(
        train_iters=steps,
        global_batch_size=micro,
        micro_batch_size=micro,
        seq_length=SEQ,
        device="cpu",
        eval_iters=0,
    )
    data = DataConfig(blend=str(blend), cache_dir=str(cache), num_workers=workers)
    return TrainingData(data, train, plan_batches(train), vocab_size=4096)


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": 1e3 * statistics.median(ordered),
        "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
        "max_ms": 1e3 * ordered[-1],
    }


def measure(blend: Path, workdir: Path, micro: int, steps: int, workers: int, step_s: float):
    cache = workdir / f"cache-mbs{micro}"
    cold = loader(blend, cache, micro, steps, 0)
    start = time.perf_counter()
    cold.train_dataset(1)
    index_s = time.perf_counter() - start

    sync = loader(blend, cache, micro, steps, 0)
    sync.train_dataset(1)  # indices cached now: memory-mapped
    sync_times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync.next_train_batches()
        sync_times.append(time.perf_counter() - start)

    background = loader(blend, cache, micro, steps, workers)
    background.train_dataset(1)
    waits = []
    for _ in range(steps):
        start = time.perf_counter()
        background.next_train_batches()
        waits.append(time.perf_counter() - start)
        time.sleep(step_s)  # the GPU step the workers overlap with
    background.close()
    # The first wait includes starting the workers (once per run and after a resume).
    return {
        "micro_batch_size": micro,
        "index_build_s": index_s,
        "synchronous": summary(sync_times),
        "workers": {"num_workers": workers, "first_ms": 1e3 * waits[0], **summary(waits[1:])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nemotron-loader-bench"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=0.5, help="simulated GPU step (workers run)")
    parser.add_argument(
        "--gpu-step-s",
        type=float,
        default=0.5,
        help="GPU step time of the Nano3 proxy on one H200 (denominator)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    blend = prepare_blend(args.workdir)
    results = [measure(blend, args.workdir, micro, args.steps, args.workers, args.step_s) for micro in (1, 2)]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "seq_length": SEQ,
        "steps": args.steps,
        "gpu_step_s": args.gpu_step_s,
        "results": results,
    }
    print(
        f"\n| micro batch | index build (once) | synchronous median / p90 / max | "
        f"of a {args.gpu_step_s:g} s GPU step | {args.workers} workers: exposed median / p90 / max "
        f"(first) | of a GPU step |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        s, w = r["synchronous"], r["workers"]
        print(
            f"| {r['micro_batch_size']} x {SEQ} | {r['index_build_s']:.2f} s | "
            f"{s['median_ms']:.2f} / {s['p90_ms']:.2f} / {s['max_ms']:.2f} ms | "
            f"{s['median_ms'] / 1e3 / args.gpu_step_s:.3%} | "
            f"{w['median_ms']:.3f} / {w['p90_ms']:.3f} / {w['max_ms']:.3f} ms "
            f"({w['first_ms']:.0f} ms) | {w['median_ms'] / 1e3 / args.gpu_step_s:.4%} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
