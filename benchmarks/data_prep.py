"""Data-prep throughput of the CLI as users run it, against the tokenizer's ceiling and Megatron-LM.

Three measurements on the same corpus, tokenizer and CPU cores (pinned with `taskset`):

1. The ceiling: the tokenizer call data prep really makes (`encode_batch_fast`, batches of
   1024 documents) in one single-threaded process, on the texts already in memory: no
   reading, JSON parsing, routing or writing. Tokens per second of one core.
2. `nemotron nano3 data prep pretrain -c <recipe> --force` in a fresh process with the shipped
   defaults (every core of the process's CPU set, work units sized by the prep), start-up,
   planning, tokenizing, assembling and the swap included. Tokens per second (wall), per core,
   and against the ceiling.
3. Megatron-LM's `tools/preprocess_data.py` (`--workers N`, HF tokenizer, `--append-eod`) on
   the same jsonl, when `--megatron DIR` names a Megatron-LM checkout (never vendored: fetch
   it, e.g. `git clone --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM`; its
   tokenizer path needs `six` and `transformers`). Both tools write the same token sequences
   (checked: document count and the multiset of per-document token hashes).

Each is run `--repeats` times, alternating, and reported as best-of and median (this machine may
be shared; the load average is printed before and after). The corpus (default 100 MB of jsonl)
is generated from the installed Python standard library's sources, and the tokenizer is a 32K
byte-level BPE trained on its first few MB; both are cached in --workdir.

    .venv/bin/python benchmarks/data_prep.py --size-mb 100 --cores 2 --megatron /path/to/Megatron-LM
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

DOC_CHARS = 6000


def _stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, len(text), DOC_CHARS):
            chunk = text[start : start + DOC_CHARS]
            if chunk.strip():
                docs.append(chunk)
    return docs


def build_corpus(directory: Path, size_mb: int) -> list[Path]:
    marker = directory / f"corpus-{size_mb}mb.done"
    files = sorted(directory.glob(f"corpus-{size_mb}mb-*.jsonl"))
    if marker.is_file() and files:
        return files
    docs = _stdlib_documents()
    rng = random.Random(0)
    target, written, part = size_mb * 1_000_000, 0, 0
    files = []
    handle = None
    while written < target:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            if handle is None or handle.tell() > 50_000_000:
                if handle:
                    handle.close()
                path = directory / f"corpus-{size_mb}mb-{part:03d}.jsonl"
                files.append(path)
                handle = open(path, "w")
                part += 1
            line = json.dumps({"text": docs[i]}) + "\n"
            handle.write(line)
            written += len(line.encode())
            if written >= target:
                break
    handle.close()
    marker.write_text("ok\n")
    return files


def build_tokenizer(directory: Path, corpus: list[Path], vocab_size: int) -> Path:
    path = directory / f"bpe-{vocab_size}" / "tokenizer.json"
    if path.is_file():
        _write_tokenizer_config(path.parent)
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        budget = 5_000_000
        with open(corpus[0]) as handle:
            for line in handle:
                text = json.loads(line)["text"]
                budget -= len(text)
                yield text
                if budget < 0:
                    return

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    _write_tokenizer_config(path.parent)
    return path


def _write_tokenizer_config(directory: Path) -> None:
    # eos/bos for data prep; tokenizer_class for transformers' AutoTokenizer (Megatron's HF path).
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "bos_token": "<s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )


def _cpu_set(cores: int) -> list[int]:
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise SystemExit(f"--cores {cores}: only {len(available)} CPUs available to this process")
    return available[:cores]


def _pinned(command: list[str], cpus: list[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


# Runs a command as a child subreaper: every descendant (the CLI's forkserver and its workers,
# Megatron's pool) is reaped here, so RUSAGE_CHILDREN counts the CPU time of the whole tree.
REAPER_SCRIPT = """
import ctypes, json, os, resource, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
start = time.perf_counter()
code = subprocess.call(sys.argv[1:], stdout=sys.stdout, stderr=sys.stderr)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": code, "wall": time.perf_counter() - start,
                  "cpu": usage.ru_utime + usage.ru_stime}), file=sys.stderr)
"""


def _run_timed(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """(process, wall seconds, CPU seconds of the command and all its descendants)."""
    proc = subprocess.run(
        [sys.executable, "-c", REAPER_SCRIPT, *command], capture_output=True, text=True, **kwargs
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    proc.returncode = report["rc"]
    return proc, report["wall"], report["cpu"]


CEILING_SCRIPT = """
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as a data-prep worker
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for path in sys.argv[3:] for line in open(path)]
batch = int(sys.argv[2])
tokens, start, cpu = 0, time.perf_counter(), time.process_time()
for i in range(0, len(texts), batch):
    tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + batch], add_special_tokens=False))
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start,
                  "cpu_seconds": time.process_time() - cpu}))
"""


def measure_ceiling(tokenizer_path: Path, corpus: list[Path], batch_docs: int, cpu: int) -> dict:
    """`encode_batch_fast` in one single-threaded process pinned to one core."""
    command = [sys.executable, "-c", CEILING_SCRIPT, str(tokenizer_path), str(batch_docs), *map(str, corpus)]
    row = json.loads(
        subprocess.run(_pinned(command, [cpu]), capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_seconds"]
    return row


def measure_cli(tokenizer_path: Path, corpus: list[Path], cpus: list[int], out: Path) -> dict:
    """The CLI in a fresh process with the shipped defaults (only paths and the tokenizer set)."""
    recipe = out.parent / "bench-prep.yaml"
    blend = out.parent / "bench-blend.json"
    pattern = str(corpus[0].parent / corpus[0].name.rsplit("-", 1)[0]) + "-*.jsonl"
    blend.write_text(json.dumps({"datasets": [{"name": "stdlib", "path": pattern, "weight": 1.0}]}))
    recipe.write_text(f"blend_path: {blend}\noutput_dir: {out}\ntokenizer:\n  model: {tokenizer_path}\n")
    nemotron = Path(sys.executable).with_name("nemotron")
    command = [
        str(nemotron),
        "nano3",
        "data",
        "prep",
        "pretrain",
        "-c",
        str(recipe),
        "--force",
        "--job-dir",
        str(out.parent / f"job-{time.time_ns()}"),
    ]
    proc, elapsed, cpu = _run_timed(_pinned(command, cpus))
    if proc.returncode != 0:
        raise SystemExit(f"data prep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metadata = json.loads((out / "metadata.json").read_text())
    tokens = sum(split["tokens"] for split in metadata["counts"].values())
    documents = sum(split["documents"] for split in metadata["counts"].values())
    # CPU: the CLI process and all its descendants; metadata's cpu_s counts run_data_prep only.
    return {
        "tokens": tokens,
        "documents": documents,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "prep_cpu_seconds": metadata["cpu_s"],
        "workers": metadata["producer"]["workers"],
        "units": sum(s["work_units"] for s in metadata["sources"]),
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
    }


def measure_megatron(
    megatron: Path, tokenizer_path: Path, corpus: list[Path], cpus: list[int], out: Path
) -> dict:
    """Megatron-LM's preprocess_data.py on the same jsonl (one input: the corpus concatenated)."""
    merged = out.parent / "megatron-input.jsonl"
    if not merged.is_file():
        with open(merged, "wb") as handle:
            for path in corpus:
                handle.write(path.read_bytes())
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(megatron / "tools" / "preprocess_data.py"),
        "--input",
        str(merged),
        "--output-prefix",
        str(out / "mt"),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tokenizer_path.parent),
        "--json-keys",
        "text",
        "--append-eod",
        "--workers",
        str(len(cpus)),
        "--log-interval",
        "100000",
    ]
    proc, elapsed, cpu = _run_timed(_pinned(command, cpus), cwd=megatron)
    if proc.returncode != 0:
        raise SystemExit(f"Megatron preprocess_data.py failed:\n{proc.stderr[-3000:]}")
    from nemotron.data.indexed import IndexedDataset

    (prefix,) = {p.with_suffix("") for p in out.glob("*.idx")}
    dataset = IndexedDataset(prefix)
    return {
        "tokens": dataset.num_tokens,
        "documents": len(dataset),
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "workers": len(cpus),
        "tokens_per_s": dataset.num_tokens / elapsed,
        "tokens_per_cpu_s": dataset.num_tokens / cpu,
        "prefix": str(prefix),
    }


def _document_hashes(prefixes: list[str]) -> list[str]:
    from nemotron.data.indexed import IndexedDataset

    hashes = []
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        hashes += [
            hashlib.blake2b(dataset[i].astype("<i8").tobytes(), digest_size=12).hexdigest()
            for i in range(len(dataset))
        ]
    return sorted(hashes)


def same_sequences(prep_out: Path, megatron_prefix: str) -> bool:
    metadata = json.loads((prep_out / "metadata.json").read_text())
    ours = [row["prefix"] for rows in metadata["splits"].values() for row in rows]
    return _document_hashes(ours) == _document_hashes([megatron_prefix])


def _summary(rows: list[dict], key: str = "tokens_per_s") -> tuple[float, float]:
    values = [row[key] for row in rows]
    return max(values), statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nemotron-bench-data-prep"))
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to pin every run to")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-docs", type=int, default=1024)
    parser.add_argument("--megatron", type=Path, help="a Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="build the corpus and tokenizer, measure nothing"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.workdir, args.size_mb)
    corpus_bytes = sum(p.stat().st_size for p in corpus)
    tokenizer_path = build_tokenizer(args.workdir, corpus, args.vocab_size)
    if args.prepare_only:
        print(f"corpus {corpus_bytes:,} bytes in {len(corpus)} files; tokenizer {tokenizer_path}")
        return
    cpus = _cpu_set(args.cores)
    load_before = os.getloadavg()
    ceiling, prep, megatron = [], [], []
    for repeat in range(args.repeats):
        ceiling.append(measure_ceiling(tokenizer_path, corpus, args.batch_docs, cpus[0]))
        prep.append(measure_cli(tokenizer_path, corpus, cpus, args.workdir / "out-cli"))
        if args.megatron:
            megatron.append(
                measure_megatron(args.megatron, tokenizer_path, corpus, cpus, args.workdir / "out-megatron")
            )
        print(
            f"repeat {repeat + 1}: ceiling {ceiling[-1]['tokens_per_s']:,.0f} tok/s/core, "
            f"CLI {prep[-1]['tokens_per_s']:,.0f} tok/s"
            + (f", Megatron {megatron[-1]['tokens_per_s']:,.0f} tok/s" if megatron else ""),
            flush=True,
        )
    same = same_sequences(args.workdir / "out-cli", megatron[-1]["prefix"]) if megatron else None
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"pinned to {cpus}",
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "corpus_bytes": corpus_bytes,
        "ceiling": ceiling,
        "prep": prep,
        "megatron": megatron,
        "same_token_sequences": same,
    }
    print(json.dumps(report, indent=2))
    cores = len(cpus)
    best_ceiling, median_ceiling = _summary(ceiling)
    best_prep, median_prep = _summary(prep)
    cpu_ceiling = statistics.median(r["tokens_per_cpu_s"] for r in ceiling)

    def row(name: str, rows: list[dict]) -> str:
        best, median = _summary(rows)
        per_cpu = statistics.median(r["tokens_per_cpu_s"] for r in rows)
        return (
            f"| {name} | {rows[0]['tokens']:,} | {best:,.0f} | {median:,.0f} | {best / cores:,.0f} | "
            f"{median / cores:,.0f} | {median / cores / median_ceiling:.1%} | {per_cpu:,.0f} | "
            f"{per_cpu / cpu_ceiling:.1%} |"
        )

    print()
    print(
        f"| run ({cores} cores) | tokens | tokens/s best | tokens/s median | per core best | per core median | "
        f"per core vs ceiling (median, wall) | tokens per CPU-s (median) | vs ceiling (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| `encode_batch_fast` ceiling, 1 process, 1 core | {ceiling[0]['tokens']:,} | {best_ceiling:,.0f} | "
        f"{median_ceiling:,.0f} | {best_ceiling:,.0f} | {median_ceiling:,.0f} | - | {cpu_ceiling:,.0f} | - |"
    )
    print(
        row(
            f"`nemotron nano3 data prep pretrain` (defaults: {prep[0]['workers']} workers, "
            f"{prep[0]['units']} units)",
            prep,
        )
    )
    if megatron:
        best_mt, median_mt = _summary(megatron)
        print(row(f"Megatron-LM `preprocess_data.py --workers {cores}`", megatron))
        print(
            f"\nCLI / Megatron tokens/s: best {best_prep / best_mt:.2f}x, median {median_prep / median_mt:.2f}x; "
            f"same token sequences: {same}"
        )
    print(f"load average before {load_before}, after {report['load_avg_after']}")


if __name__ == "__main__":
    main()
