"""Work units sized from the input and the worker count; one core per worker; idle-core warnings."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from nemotron.data import prep as prep_module
from nemotron.data import sources as src
from nemotron.data.config import DataPrepConfig, TokenizerConfig
from nemotron.data.prep import MIN_UNIT_BYTES, UNITS_PER_WORKER, run_data_prep, unit_bytes_for

from .conftest import make_docs, write_jsonl

MB = 1 << 20


def test_unit_size_spreads_the_input_over_every_worker():
    # 8 units per worker while the input allows, at least 1 MiB, at most work_unit_mb.
    assert unit_bytes_for(100 * MB, 2, 64) == -(-100 * MB // (UNITS_PER_WORKER * 2))
    assert unit_bytes_for(100 * MB, 64, 64) == MIN_UNIT_BYTES
    assert unit_bytes_for(100_000 * MB, 2, 64) == 64 * MB
    assert unit_bytes_for(0, 4, 64) == MIN_UNIT_BYTES
    assert unit_bytes_for(100 * MB, 2, 0.5) == MB // 2


def _plan(tmp_path: Path, workers: int, work_unit_mb: float = 64.0):
    cfg = DataPrepConfig(
        blend_path=str(tmp_path / "blend.json"),
        output_dir=str(tmp_path / "out"),
        tokenizer=TokenizerConfig(model="unused"),
        work_unit_mb=work_unit_mb,
    )
    blend = prep_module.load_blend(tmp_path / "blend.json")
    plans = prep_module._plan_datasets(cfg, blend, tmp_path)
    total = sum(max(0, p.size) for plan in plans for p in plan.source.pieces)
    unit_bytes = unit_bytes_for(total, workers, cfg.work_unit_mb)
    return prep_module._units(plans, None, tmp_path / "units", unit_bytes), unit_bytes, total


def test_large_files_are_split_and_small_ones_grouped(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", make_docs(60000, seed=90))  # ~1.9 MB
    small_dir = tmp_path / "small"
    for k in range(40):
        write_jsonl(small_dir / f"part-{k:03d}.jsonl", make_docs(30, seed=100 + k))  # ~1 KB each
    (tmp_path / "blend.json").write_text(
        json.dumps(
            {
                "datasets": [
                    {"name": "big", "path": "big.jsonl", "weight": 1},
                    {"name": "small", "path": "small", "weight": 1},
                ]
            }
        )
    )
    units, unit_bytes, total = _plan(tmp_path, workers=2, work_unit_mb=0.25)
    assert unit_bytes == MB // 4
    big_units = [u for u in units if u.dataset == "big"]
    small_units = [u for u in units if u.dataset == "small"]
    # The big file is cut into byte ranges of at most unit_bytes, in order, covering it exactly.
    ranges = [(p.start, p.end) for u in big_units for p in u.pieces]
    assert len(big_units) == -(-big.stat().st_size // unit_bytes) >= 2 * UNITS_PER_WORKER // 2
    assert ranges[0][0] == 0 and ranges[-1][1] == big.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # The 40 small files become one unit (they fit in one), read in file order.
    assert len(small_units) == 1 and len(small_units[0].pieces) == 40
    assert [Path(p.files[0]).name for p in small_units[0].pieces] == sorted(
        f"part-{k:03d}.jsonl" for k in range(40)
    )
    # Reading the cut pieces yields the file's records, in order, once each.
    texts = [r.text for u in big_units for p in u.pieces for r in src.iter_records(p, "text")]
    assert texts == make_docs(60000, seed=90)


def test_many_more_units_than_workers_by_default(tmp_path):
    write_jsonl(tmp_path / "big.jsonl", make_docs(150000, seed=91))  # ~23 MB
    (tmp_path / "blend.json").write_text(
        json.dumps({"datasets": [{"name": "big", "path": "big.jsonl", "weight": 1}]})
    )
    units, unit_bytes, total = _plan(tmp_path, workers=2)  # shipped work_unit_mb: 64
    assert total > 16 * MB and len(units) == UNITS_PER_WORKER * 2
    # Before, the default cut at 64 MB made this one unit: one busy core out of two.


@pytest.fixture
def small_corpus(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(80, seed=92))
    (tmp_path / "blend.json").write_text(
        json.dumps({"datasets": [{"name": "a", "path": "a.jsonl", "weight": 1}]})
    )
    return tmp_path


def _cfg(root: Path, bpe_dir: Path, **overrides) -> DataPrepConfig:
    return DataPrepConfig(
        blend_path=str(root / "blend.json"),
        output_dir=str(root / "out"),
        tokenizer=TokenizerConfig(model=str(bpe_dir)),
        num_shards=2,
        **overrides,
    )


def test_one_worker_in_process_uses_one_core_and_restores_the_environment(small_corpus, bpe_dir, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    seen = []
    real = prep_module.Tokenizer.encode_batch

    def encode_batch(self, texts):
        seen.append((os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("RAYON_NUM_THREADS")))
        return real(self, texts)

    monkeypatch.setattr(prep_module.Tokenizer, "encode_batch", encode_batch)
    run_data_prep(_cfg(small_corpus, bpe_dir, num_workers=1))
    assert seen and set(seen) == {("false", "1")}
    assert "TOKENIZERS_PARALLELISM" not in os.environ and os.environ["RAYON_NUM_THREADS"] == "7"


def test_a_plan_that_leaves_cores_idle_is_warned_about(small_corpus, bpe_dir, monkeypatch):
    monkeypatch.setattr(prep_module, "available_cpus", lambda: 4)
    events = []
    result = run_data_prep(_cfg(small_corpus, bpe_dir, num_workers=1), progress=events.append)
    assert any("num_workers=1 leaves 3 of the 4 CPUs" in w for w in result.warnings)
    assert [e.warning for e in events if e.warning] == result.warnings
    # A small input: fewer units than workers.
    result = run_data_prep(_cfg(small_corpus, bpe_dir, force=True, work_unit_mb=64))
    assert any("only 1 work units to do for 4 workers: 3 of them will be idle" in w for w in result.warnings)
    # Enough units for every worker, every CPU used: no warning.
    result = run_data_prep(_cfg(small_corpus, bpe_dir, force=True, num_workers=4, work_unit_mb=0.001))
    assert result.warnings == []


def test_more_workers_than_the_cpus_can_run_is_one_error_before_any_starts(
    small_corpus, bpe_dir, monkeypatch
):
    """num_workers: 1000000 (a typo) started a process per work unit, tens of thousands on a
    large input; now refused, naming the key, before anything is read or written. Up to 16
    per CPU stays allowed (a config written for a larger node runs, slower)."""
    monkeypatch.setattr(prep_module, "available_cpus", lambda: 2)
    with pytest.raises(
        prep_module.DataPrepError,
        match=r"num_workers 33 is more than 16 worker processes per CPU for the 2 CPUs",
    ):
        run_data_prep(_cfg(small_corpus, bpe_dir, num_workers=33))
    assert not (small_corpus / "out").exists()
    from nemotron.data.config import too_many_workers

    assert too_many_workers("num_workers", 32, 2) is None
    assert too_many_workers("num_workers", 10**6, 64) is not None


@pytest.mark.parametrize("size", [0.0, -1.0, math.inf, math.nan])
def test_a_work_unit_size_that_is_no_size_is_one_error(small_corpus, bpe_dir, size):
    """The library's own check (the recipe loader refuses these too): an infinite size became
    int(inf) bytes in the planning, a bare OverflowError naming no setting."""
    with pytest.raises(prep_module.DataPrepError, match=r"work_unit_mb must be a finite number > 0"):
        run_data_prep(_cfg(small_corpus, bpe_dir, work_unit_mb=size))
    assert not (small_corpus / "out").exists()


def test_a_work_unit_size_absurd_for_the_input_is_one_error(small_corpus, bpe_dir, monkeypatch):
    """work_unit_mb 1e-6 (one unit per byte) planned a unit per byte of input: hours, then out
    of memory on a large one. Checked on a small input with a small bound: a unit per byte,
    one more unit than the bound, is refused; larger units under the bound are planned."""
    cfg = _cfg(small_corpus, bpe_dir, work_unit_mb=1e-6)  # 1 byte a unit
    size = (small_corpus / "a.jsonl").stat().st_size
    monkeypatch.setattr(prep_module, "MAX_UNITS", size - 1)
    with pytest.raises(
        prep_module.DataPrepError,
        match=rf"work_unit_mb 1e-06 cuts the {size:,} bytes of input into at least {size:,} work units, more than {size - 1:,}",
    ):
        run_data_prep(cfg)
    assert not (small_corpus / "out" / "metadata.json").exists()
    monkeypatch.setattr(prep_module, "MAX_UNITS", size)
    result = run_data_prep(dataclasses.replace(cfg, work_unit_mb=1e-4, num_workers=1))  # ~100 bytes a unit
    assert result.totals("train")[0] > 0
