"""Data-prep throughput: tokens/s per core of `run_data_prep` against the tokenizer's own ceiling.

The ceiling is the same tokenizer's raw `encode_batch` (and `encode_batch_fast`) on the same
texts, in one single-threaded process, with the texts already in memory: no reading, JSON
parsing, splitting, filtering or writing. Data prep is then run end to end (jsonl in, Megatron
shards + blend.json + metadata.json out) with 1 and 2 worker processes; its tokens/s per core
over the ceiling is the efficiency, and tokens/s(2) / tokens/s(1) the scaling.

The corpus (default 200 MB of jsonl) is generated from the installed Python standard library's
sources (realistic code and prose; repeated with a different document order once exhausted),
and the tokenizer is a 32K byte-level BPE trained on its first few MB. Both are cached in
--workdir.

    TOKENIZERS_PARALLELISM=false .venv/bin/python benchmarks/data_prep.py --size-mb 200
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers starts its thread pool

import argparse
import json
import platform
import random
import shutil
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(sample(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return path


def measure_ceiling(tokenizer_path: Path, corpus: list[Path], batch_docs: int) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    texts = [json.loads(line)["text"] for path in corpus for line in open(path)]
    results = {}
    for method in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, method)
        tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
        for i in range(0, len(texts), batch_docs):
            tokens += sum(len(e.ids) for e in encode(texts[i : i + batch_docs], add_special_tokens=False))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        results[method] = {"tokens": tokens, "seconds": elapsed, "cpu_seconds": cpu,
                           "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu}
    del texts
    return results


def measure_prep(tokenizer_path: Path, corpus_dir: Path, size_mb: int, workers: int, out: Path) -> dict:
    from nemotron.data.config import DataPrepConfig, TokenizerConfig
    from nemotron.data.prep import run_data_prep

    blend = out.parent / f"blend-{size_mb}.json"
    blend.write_text(json.dumps({"datasets": [
        {"name": "stdlib", "path": str(corpus_dir / f"corpus-{size_mb}mb-*.jsonl"), "weight": 1.0}
    ]}))
    cfg = DataPrepConfig(
        blend_path=str(blend), output_dir=str(out), tokenizer=TokenizerConfig(model=str(tokenizer_path)),
        num_shards=8, num_workers=workers, force=True, max_doc_tokens=None,
    )
    start = time.perf_counter()
    result = run_data_prep(cfg)
    # CPU seconds of the calling process and of every worker process (measured in the workers).
    elapsed, cpu = time.perf_counter() - start, result.cpu_s
    tokens = sum(row.tokens for row in result.summary)
    shutil.rmtree(out, ignore_errors=True)
    return {"workers": workers, "tokens": tokens, "seconds": elapsed, "cpu_seconds": cpu,
            "tokens_per_s": tokens / elapsed, "tokens_per_s_per_core": tokens / elapsed / workers,
            "tokens_per_cpu_s": tokens / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nemotron-bench-data-prep"))
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-docs", type=int, default=1024)
    parser.add_argument("--prepare-only", action="store_true", help="build the corpus and tokenizer, measure nothing")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.workdir, args.size_mb)
    corpus_bytes = sum(p.stat().st_size for p in corpus)
    tokenizer_path = build_tokenizer(args.workdir, corpus, args.vocab_size)
    if args.prepare_only:
        print(f"corpus {corpus_bytes:,} bytes in {len(corpus)} files; tokenizer {tokenizer_path}")
        return

    ceiling = measure_ceiling(tokenizer_path, corpus, args.batch_docs)
    best = max(ceiling.values(), key=lambda r: r["tokens_per_cpu_s"])
    runs = [measure_prep(tokenizer_path, args.workdir, args.size_mb, int(w), args.workdir / f"out-{w}")
            for w in args.workers.split(",")]
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg": os.getloadavg(),
        "corpus_bytes": corpus_bytes,
        "ceiling": ceiling,
        "prep": runs,
    }
    print(json.dumps(report, indent=2))
    print()
    print("| run | tokens | wall s | CPU s | tokens/s (wall) | tokens/s per core (wall) | "
          "tokens per CPU-second | % of ceiling per core (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in ceiling.items():
        print(f"| {name} (1 process, ceiling) | {row['tokens']:,} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s']:,.0f} | {row['tokens_per_cpu_s']:,.0f} | - |")
    for row in runs:
        print(f"| run_data_prep, {row['workers']} worker(s) | {row['tokens']:,} | {row['seconds']:.1f} | "
              f"{row['cpu_seconds']:.1f} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s_per_core']:,.0f} | "
              f"{row['tokens_per_cpu_s']:,.0f} | {100 * row['tokens_per_cpu_s'] / best['tokens_per_cpu_s']:.1f}% |")
    if len(runs) >= 2:
        print(f"\nscaling {runs[0]['workers']} -> {runs[-1]['workers']} workers: "
              f"{runs[-1]['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
