"""Regenerate tests/data/fixtures/megatron_order/: sample orders built by Megatron-Core itself.

    pip install megatron-core==0.16.1     # CPU is enough: the wheel ships its compiled helpers
    python tests/data/make_megatron_fixtures.py

Five small token datasets (b with empty documents, the first among them; d of long documents;
e of fewer tokens than one sample) are written with Megatron's own `IndexedDatasetBuilder`;
Megatron's `BlendedMegatronDatasetBuilder` then builds, for each case, the train split of a
per-split blend (what `--per-split-data-args-path` gives):
one prefix (a `GPTDataset`) asked for 1, 2, 5 and 7 epochs with the separate final epoch on
both sides of its threshold, and three-prefix blends whose datasets run several epochs, where
Megatron's inner ceil (`ceil(ceil(N * w) * 1.005)`) asks a dataset for one sample more than
`ceil(N * w * 1.005)` would; and blends of prefixes without weights (one whitespace-separated
string, read by Megatron's `get_blend_from_list`), where each dataset is built for one epoch
and the blend is weighted by their sample counts, with N below and above their sum (Megatron
then caps the blend at the sum). The "splits" cases build all three splits, each asked for
what Megatron's training loop asks (`loop_sizes`), and record each split. Blends with a prefix
without tokens are probed too (Megatron builds none: its outcome is in cases.json). The fixtures keep the documents, every index array Megatron built
and the tokens of every sample a run reads, so tests/data/test_megatron_order.py needs neither
Megatron nor this script.

    python tests/data/make_megatron_fixtures.py --split

writes tests/data/fixtures/megatron_split/ instead (tests/data/test_megatron_split.py): one
blend for every split cut by a split string (Megatron's `--data-path` with `--split`), each
split built with the sample count Megatron's training loop asks of it, every index array of
each split and the tokens it serves; and what Megatron does when a prefix's share of a split
holds no document (run in a child with a timeout: it does not return).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "fixtures" / "megatron_order"
SPLIT_OUT = Path(__file__).resolve().parent / "fixtures" / "megatron_split"
THRESHOLD = 0.80  # Megatron's separate-final-epoch threshold


def make_documents() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(20260322)

    def docs(count, low, high, vocab=60000):
        return [
            rng.integers(0, vocab, size=int(rng.integers(low, high + 1))).astype(np.uint16)
            for _ in range(count)
        ]

    with_empty = docs(17, 0, 90)
    with_empty[0] = with_empty[0][:0]  # an empty first document (sample 0 still starts at it)
    with_empty[5] = with_empty[5][:0]
    a, c = docs(41, 1, 60), docs(29, 3, 45)  # drawn after b, as before d and e were added
    # d: a few long documents, each spanning dozens of samples of seq_length 5 (drawn after
    # a, b and c, so theirs are unchanged); e: shorter than one sample, with an empty document.
    long = docs(7, 120, 400)
    tiny = docs(3, 2, 4)
    tiny[1] = tiny[1][:0]
    return {"a": a, "b": with_empty, "c": c, "d": long, "e": tiny}


def epoch_counts(tokens: int, num_samples: int, seq_length: int) -> tuple[int, bool]:
    """(epochs, separate final epoch) by Megatron's rules, to document and check each case."""
    epochs = max(1, -(-(num_samples * seq_length + 1) // tokens))
    if epochs == 1:
        return 1, False
    before_last = ((epochs - 1) * tokens - 1) // seq_length
    per_epoch = (tokens - 1) // seq_length
    return epochs, num_samples - before_last < int(THRESHOLD * per_epoch)


def single_cases(tokens: dict[str, int]) -> list[dict]:
    """One-prefix cases named by what they exercise; N chosen from the dataset's token count."""
    cases = []

    def add(name, dataset, seq_length, seed, num_samples, epochs, separate):
        assert epoch_counts(tokens[dataset], num_samples, seq_length) == (epochs, separate), name
        cases.append(
            {
                "name": name,
                "kind": "dataset",
                "prefixes": [dataset],
                "weights": [1.0],
                "seq_length": seq_length,
                "seed": seed,
                "num_samples": num_samples,
                "epochs": [epochs],
                "separate_final_epoch": [separate],
            }
        )

    for dataset, s, seed in (("a", 16, 1234), ("b", 7, 5)):
        t = tokens[dataset]
        per_epoch = (t - 1) // s

        def before(e):
            return ((e - 1) * t - 1) // s

        at = int(THRESHOLD * per_epoch)
        add(f"{dataset}_1epoch", dataset, s, seed, per_epoch // 2, 1, False)
        add(f"{dataset}_2epochs_separate", dataset, s, seed, before(2) + at - 1, 2, True)
        add(f"{dataset}_2epochs_at_threshold", dataset, s, seed, before(2) + at, 2, False)
        add(f"{dataset}_5epochs_separate", dataset, s, seed, before(5) + 3, 5, True)
        add(f"{dataset}_7epochs_whole", dataset, s, seed, before(7) + per_epoch, 7, False)
    return cases


def blend_cases(tokens: dict[str, int]) -> list[dict]:
    cases = []
    for name, weights, s, seed, low in (
        ("blend_abc", [0.5, 0.3, 0.2], 16, 42, 150),
        ("blend_cab_unnormalised", [3.0, 1.0, 2.0], 9, 7, 400),
    ):
        prefixes = ["a", "b", "c"] if name == "blend_abc" else ["c", "a", "b"]
        w = np.asarray(weights, dtype=np.float64)
        w = (w / w.sum()).tolist()
        # The first N >= low where the inner ceil asks some dataset for one sample more.
        n = low
        while all(math.ceil(math.ceil(n * x) * 1.005) == math.ceil(n * x * 1.005) for x in w):
            n += 1
        requested = [math.ceil(math.ceil(n * x) * 1.005) for x in w]
        counts = [epoch_counts(tokens[p], r, s) for p, r in zip(prefixes, requested)]
        assert any(e > 1 for e, _ in counts), name
        cases.append(
            {
                "name": name,
                "kind": "blend",
                "prefixes": prefixes,
                "weights": weights,
                "seq_length": s,
                "seed": seed,
                "num_samples": n,
                "requested": requested,
                "epochs": [e for e, _ in counts],
                "separate_final_epoch": [sep for _, sep in counts],
            }
        )
    return cases


def unweighted_cases(tokens: dict[str, int]) -> list[dict]:
    """Prefixes without weights: each dataset is read once, so N is set from their samples."""
    cases = []
    for name, prefixes, s, seed, below in (
        ("unweighted_bca", ["b", "c", "a"], 16, 11, 5),
        ("unweighted_abc_capped", ["a", "b", "c"], 9, 3, -4),
    ):
        samples = [(tokens[p] - 1) // s for p in prefixes]
        cases.append(
            {
                "name": name,
                "kind": "unweighted",
                "prefixes": prefixes,
                "weights": None,
                "seq_length": s,
                "seed": seed,
                "num_samples": sum(samples) - below,
                "samples_per_dataset": samples,
                "epochs": [1] * len(prefixes),
                "separate_final_epoch": [False] * len(prefixes),
            }
        )
    return cases


def make_split_documents() -> dict[str, list[np.ndarray]]:
    """Datasets for one blend cut by a split string: enough documents that "969,30,1" leaves
    each split some (Megatron cuts documents, not tokens), short ones so the fixtures stay
    small; "e" has empty documents, "g" documents that span many samples, "t" is tiny (its
    valid and test ranges of "99,1,0" and "969,30,1" hold no document)."""
    rng = np.random.default_rng(20261205)

    def docs(count, low, high, vocab=60000):
        return [
            rng.integers(0, vocab, size=int(rng.integers(low, high + 1))).astype(np.uint16)
            for _ in range(count)
        ]

    with_empty = docs(700, 0, 9)
    with_empty[0] = with_empty[0][:0]
    return {
        "d": docs(600, 1, 12),
        "e": with_empty,
        "f": docs(520, 2, 10),
        "g": docs(40, 30, 130),
        "t": docs(5, 3, 9),
    }


def split_cases() -> list[dict]:
    """One blend (`--data-path`, `--split`): each case names the training loop's sizes, from
    which Megatron's `get_train_valid_test_num_samples` asks train_iters * gbs training
    samples, (train_iters // eval_interval + 1) * eval_iters * gbs valid and eval_iters * gbs
    test samples."""
    cases = []
    for name, prefixes, weights, split, s, seed, loop in (
        ("one_99_1_0", ["d"], None, "99,1,0", 8, 1234, (20, 4, 5, 2)),
        ("one_weighted_1_1_1", ["d"], [1.0], "1,1,1", 8, 5, (12, 4, 4, 1)),
        ("abc_969_30_1", ["d", "e", "f"], [0.5, 0.3, 0.2], "969,30,1", 8, 42, (25, 4, 5, 2)),
        ("cab_98_2_0_unnormalised", ["f", "d", "e"], [3.0, 1.0, 2.0], "98,2,0", 7, 7, (16, 6, 4, 1)),
        ("unweighted_100_0_0", ["e", "f", "d"], None, "100,0,0", 9, 11, (30, 8, 10, 1)),
        ("unweighted_7_2_1", ["d", "e"], None, "7,2,1", 8, 3, (10, 8, 5, 2)),
        ("long_docs_9_0.5_0.5", ["g", "d"], [2.0, 1.0], "9 0.5 0.5", 16, 99, (14, 4, 7, 2)),
        ("long_doc_one_98_2", ["g"], None, "98,2", 16, 17, (10, 4, 2, 3)),
    ):
        train_iters, gbs, eval_interval, eval_iters = loop
        sizes = [train_iters * gbs, (train_iters // eval_interval + 1) * eval_iters * gbs, eval_iters * gbs]
        cases.append(
            {
                "name": name,
                "kind": "split",
                "prefixes": prefixes,
                "weights": weights,
                "split": split,
                "seq_length": s,
                "seed": seed,
                "train_iters": train_iters,
                "global_batch_size": gbs,
                "eval_interval": eval_interval,
                "eval_iters": eval_iters,
                "sizes": sizes,
            }
        )
    return cases


def build_split_with_megatron(work: Path, case: dict):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = [str(work / p) for p in case["prefixes"]]
    config = GPTDatasetConfig(
        random_seed=case["seed"],
        sequence_length=case["seq_length"],
        blend=(prefixes, case["weights"]),
        split=case["split"],
        path_to_cache=str(work / "cache" / case["name"]),
        tokenizer=FixtureTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, case["sizes"], lambda: True, config).build()
    return config, datasets


def split_arrays(case: dict, config, datasets) -> dict[str, np.ndarray]:
    """Every index array of each split, its GPT datasets' document ranges, and its served tokens."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    arrays: dict[str, np.ndarray] = {}
    case["split_matrix"] = config.split_matrix
    case["splits"] = {}
    for split, dataset, size in zip(("train", "valid", "test"), datasets, case["sizes"]):
        if dataset is None:
            case["splits"][split] = None
            continue
        gpts = dataset.datasets if isinstance(dataset, BlendedDataset) else [dataset]
        record = {
            "class": type(dataset).__name__,
            "length": len(dataset),
            "ranges": [[int(g.indices[0]), int(g.indices[-1]) + 1] for g in gpts],
            "num_samples": [g.num_samples for g in gpts],
            "epochs": [len(g.document_index) // len(g.indices) for g in gpts],
        }
        for k, g in enumerate(gpts):
            arrays |= gpt_arrays(g, f"{split}_dataset{k}_")
            assert np.array_equal(g.indices, np.arange(*record["ranges"][k])), (case["name"], split)
        if isinstance(dataset, BlendedDataset):
            arrays[f"{split}_dataset_index"] = np.asarray(dataset.dataset_index, dtype=np.int64)
            arrays[f"{split}_dataset_sample_index"] = np.asarray(dataset.dataset_sample_index, dtype=np.int64)
        arrays[f"{split}_tokens"] = served_tokens(dataset, min(size, len(dataset)))
        case["splits"][split] = record
    return arrays


def empty_range_behaviour(work: Path) -> dict:
    """What Megatron does when a prefix's share of a split holds no document ("t" has 5
    documents: "99,1,0" gives valid round(0.99 * 5) = 5 .. 5). Weighted, its GPTDataset asks
    for samples from zero tokens: `_get_num_epochs` never returns (run in a child with a
    timeout). Without weights: the empty split has length 0, which `BlendedDataset` rejects."""
    import subprocess

    outcome = {}
    for label, weights in (("weighted", [1.0, 1.0]), ("unweighted", None)):
        script = (
            "import sys, numpy as np, torch; sys.path[:0] = " + repr(sys.path) + "\n"
            "from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder\n"
            "from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig\n"
            "import make_megatron_fixtures as m\n"
            f"torch.distributed.init_process_group('gloo', init_method='file://{work / ('pg-' + label)}', "
            "rank=0, world_size=1)\n"
            f"cfg = GPTDatasetConfig(random_seed=1, sequence_length=4, blend=([{str(work / 't')!r}, "
            f"{str(work / 'd')!r}], {weights!r}), split='99,1,0', path_to_cache={str(work / 'cache' / label)!r}, "
            "tokenizer=m.FixtureTokenizer(), reset_position_ids=False, reset_attention_mask=False, "
            "eod_mask_loss=False, create_attention_mask=False)\n"
            "try:\n"
            "    BlendedMegatronDatasetBuilder(GPTDataset, [8, 8, 0], lambda: True, cfg).build()\n"
            "    print('BUILT')\n"
            "except BaseException as e:\n"
            "    print('ERROR', type(e).__name__, e)\n"
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", script],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=60,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith(("BUILT", "ERROR"))]
            outcome[label] = lines[-1] if lines else done.stderr[-500:]
        except subprocess.TimeoutExpired:
            outcome[label] = "no result within 60 s (_get_num_epochs loops on zero tokens)"
    return outcome


def write_split_fixtures(work: Path) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    documents = make_split_documents()
    for name, docs in documents.items():
        builder = IndexedDatasetBuilder(str(work / f"{name}.bin"), dtype=np.uint16)
        for doc in docs:
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
        builder.finalize(str(work / f"{name}.idx"))
    SPLIT_OUT.mkdir(parents=True, exist_ok=True)
    cases = split_cases()
    for case in cases:
        config, datasets = build_split_with_megatron(work, case)
        arrays = split_arrays(case, config, datasets)
        np.savez_compressed(SPLIT_OUT / f"{case['name']}.npz", **arrays)
        print(f"{case['name']}: {case['splits']}")
    np.savez_compressed(
        SPLIT_OUT / "documents.npz",
        **{
            f"{name}_lengths": np.array([len(d) for d in docs], dtype=np.int32)
            for name, docs in documents.items()
        },
        **{f"{name}_tokens": np.concatenate(docs) for name, docs in documents.items()},
    )
    import megatron.core

    manifest = {
        "megatron_core": megatron.core.__version__,
        "generator": "tests/data/make_megatron_fixtures.py --split",
        "cases": cases,
        "empty_range": empty_range_behaviour(work),
    }
    tmp_manifest = SPLIT_OUT / f".cases.json.{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_manifest, SPLIT_OUT / "cases.json")


def loop_sizes(train_iters: int, eval_interval: int, eval_iters: int, global_batch_size: int) -> dict:
    """The samples Megatron's training loop asks each split for (megatron/training/training.py
    `get_train_valid_test_num_samples`, no --full-validation, no --skip-train), transcribed."""
    return {
        "train": train_iters * global_batch_size,
        "valid": (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
        "test": eval_iters * global_batch_size,
    }


def loop_for_valid(valid: int) -> dict:
    """A training loop (eval_interval 2, at least two evaluations) whose valid split is asked
    for exactly `valid` samples, with the fewest training samples (small fixtures)."""
    loops = []
    for gbs in (4, 2, 1):
        for eval_iters in range(1, valid // 2 + 1):
            if valid % (gbs * eval_iters) == 0 and valid // (gbs * eval_iters) >= 2:
                evaluations = valid // (gbs * eval_iters)
                loops.append(
                    {
                        "train_iters": 2 * (evaluations - 1),
                        "eval_interval": 2,
                        "eval_iters": eval_iters,
                        "global_batch_size": gbs,
                    }
                )
    loop = min(loops, key=lambda x: (x["train_iters"] * x["global_batch_size"], -x["global_batch_size"]))
    assert loop_sizes(**loop)["valid"] == valid
    return loop


def split_cases(tokens: dict[str, int]) -> list[dict]:
    """Per-split blends read by a whole training loop: the valid and test splits (single
    prefixes and weighted blends) asked for what Megatron's loop asks, the separate final
    epoch of the valid split on both sides of its threshold at 2 and 5 epochs, documents
    spanning dozens of samples (d) and a split shorter than one sample (e)."""
    cases = []
    s = 5
    t = tokens["d"]
    per_epoch = (t - 1) // s
    at = int(THRESHOLD * per_epoch)

    def before(e):
        return ((e - 1) * t - 1) // s

    def add(name, blend, loop, seq_length, seed):
        sizes = loop_sizes(**loop)
        epochs, separate = {}, {}
        for split, entries in blend.items():
            weights = [w for w, _ in entries] if isinstance(entries[0], list) else None
            prefixes = [p for _, p in entries] if weights is not None else entries
            if weights is None and len(prefixes) > 1:
                epochs[split] = [1] * len(prefixes)
                separate[split] = [False] * len(prefixes)
                continue
            w = np.asarray(weights if weights is not None else [1.0], dtype=np.float64)
            w = (w / w.sum()).tolist()
            n = sizes[split]
            asked = [n] if len(prefixes) == 1 else [math.ceil(math.ceil(n * x) * 1.005) for x in w]
            counts = [epoch_counts(tokens[p], r, seq_length) for p, r in zip(prefixes, asked)]
            epochs[split] = [e for e, _ in counts]
            separate[split] = [sep for _, sep in counts]
        cases.append(
            {
                "name": name,
                "kind": "splits",
                "blend": blend,
                "loop": loop,
                "num_samples": sizes,
                "seq_length": seq_length,
                "seed": seed,
                "epochs": epochs,
                "separate_final_epoch": separate,
            }
        )
        return cases[-1]

    for name, valid, epochs, separate in (
        ("splits_valid_2epochs_separate", before(2) + at - 1, 2, True),
        ("splits_valid_2epochs_at_threshold", before(2) + at, 2, False),
        ("splits_valid_5epochs_separate", before(5) + at - 1, 5, True),
        ("splits_valid_5epochs_at_threshold", before(5) + at, 5, False),
    ):
        case = add(name, {"train": ["c"], "valid": ["d"], "test": ["b"]}, loop_for_valid(valid), s, 97)
        assert case["epochs"]["valid"] == [epochs], name
        assert case["separate_final_epoch"]["valid"] == [separate], name
    weighted = add(
        "splits_weighted",
        {
            "train": [[3.0, "a"], [1.0, "c"]],
            "valid": [[0.6, "d"], [0.3, "b"], [0.3, "e"]],  # weights summing to 1.2
            "test": [[1.0, "c"], [2.0, "e"], [1.0, "b"]],
        },
        {"train_iters": 23, "eval_interval": 5, "eval_iters": 4, "global_batch_size": 6},
        9,
        2024,
    )
    assert any(e > 1 for e in weighted["epochs"]["valid"])
    add(
        "splits_tiny_and_unweighted",
        {"train": ["a"], "valid": ["e"], "test": ["b", "c"]},  # test: prefixes without weights
        {"train_iters": 7, "eval_interval": 2, "eval_iters": 2, "global_batch_size": 3},
        6,  # more than e's tokens: each of its samples spans several epochs
        8,
    )
    return cases


class FixtureTokenizer:
    """What Megatron's dataset config asks of a tokenizer (ids come pre-tokenized)."""

    vocab_size = 60000
    eod = 0
    unique_identifiers = {"class": "FixtureTokenizer"}


def build_with_megatron(work: Path, case: dict):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    if case["kind"] == "splits":
        # Every split of a per-split blend, each read as Megatron's training reads it
        # (get_blend_from_list on the split's list of strings).
        blends = []
        for split in ("train", "valid", "test"):
            entries = case["blend"][split]
            if isinstance(entries[0], list):
                words = [x for w, prefix in entries for x in (str(w), str(work / prefix))]
            else:
                words = [str(work / prefix) for prefix in entries]
            blends.append(get_blend_from_list(words))
        sizes = [case["num_samples"][split] for split in ("train", "valid", "test")]
    else:
        prefixes = [str(work / p) for p in case["prefixes"]]
        weights = case["weights"] if case["kind"] == "blend" else None
        blend = (prefixes, weights)
        if case["kind"] == "unweighted":
            # The string form of --per-split-data-args-path, read as Megatron's training reads it.
            blend = get_blend_from_list(" ".join(prefixes).split())
            assert blend == (prefixes, None), blend
        blends = [blend, None, None]
        sizes = [case["num_samples"], None, None]
    config = GPTDatasetConfig(
        random_seed=case["seed"],
        sequence_length=case["seq_length"],
        blend_per_split=blends,
        split=None,
        path_to_cache=str(work / "cache" / case["name"]),
        tokenizer=FixtureTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return built if case["kind"] == "splits" else built[0]


# Valid splits whose prefix has no tokens (no documents, or only empty ones) or, read once
# (no weights), too few for one sample: what Megatron does with each (it builds none of them).
EMPTY_PREFIX_PROBES = {
    "weighted_no_documents": ["1", "z", "1", "a"],
    "weighted_only_empty_documents": ["1", "zt", "1", "a"],
    "unweighted_no_documents": ["z", "a"],
    "unweighted_only_empty_documents": ["zt", "a"],
    "single_no_documents": ["z"],
    "single_only_empty_documents": ["zt"],
    "unweighted_shorter_than_a_sample": ["e", "a"],
}
PROBE_SEQ_LENGTH, PROBE_SAMPLES = 8, 20


def probe_empty_prefixes(work: Path) -> dict[str, str]:
    """Megatron's outcome (the exception it raises, or the blend's length) for each probe."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    outcomes = {}
    for name, words in EMPTY_PREFIX_PROBES.items():
        blend = get_blend_from_list([w if w[0].isdigit() else str(work / w) for w in words])
        config = GPTDatasetConfig(
            random_seed=1,
            sequence_length=PROBE_SEQ_LENGTH,
            blend_per_split=[None, blend, None],
            split=None,
            path_to_cache=str(work / "cache" / name),
            tokenizer=FixtureTokenizer(),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            mmap_bin_files=True,
        )
        try:
            sizes = [None, PROBE_SAMPLES, None]
            valid = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[1]
            outcomes[name] = f"built: {len(valid)} samples"
        except Exception as error:  # what Megatron raises is the finding
            outcomes[name] = f"{type(error).__name__}: {error}"
        print(f"{name}: {outcomes[name]}")
    return outcomes


def gpt_arrays(dataset, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        prefix + "document_index": np.asarray(dataset.document_index, dtype=np.int64),
        prefix + "sample_index": np.asarray(dataset.sample_index, dtype=np.int64),
        prefix + "shuffle_index": np.asarray(dataset.shuffle_index, dtype=np.int64),
    }


def dataset_arrays(dataset, prefix: str) -> dict[str, np.ndarray]:
    """The index arrays of one split: its GPTDataset's, or its blend's and each dataset's."""
    if not hasattr(dataset, "dataset_index"):
        return gpt_arrays(dataset, prefix)
    arrays = {
        prefix + "dataset_index": np.asarray(dataset.dataset_index, dtype=np.int64),
        prefix + "dataset_sample_index": np.asarray(dataset.dataset_sample_index, dtype=np.int64),
    }
    for k, member in enumerate(dataset.datasets):
        arrays |= gpt_arrays(member, f"{prefix}dataset{k}_")
    return arrays


def served_tokens(dataset, count: int) -> np.ndarray:
    """[count, seq_length + 1]: the tokens of samples 0..count-1 as Megatron serves them."""
    rows = []
    for i in range(count):
        item = dataset[i]
        rows.append(np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]]))
    return np.stack(rows).astype(np.uint16)


def main() -> int:
    import megatron.core
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    version = megatron.core.__version__
    if version != "0.16.1":
        print(f"warning: megatron-core {version}, the fixtures describe 0.16.1", file=sys.stderr)
    if "--split" in sys.argv[1:]:
        # Only the one-blend split-string fixtures (fixtures/megatron_split), the others untouched.
        with tempfile.TemporaryDirectory() as tmp:
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{Path(tmp) / 'pg'}", rank=0, world_size=1
            )
            write_split_fixtures(Path(tmp))
            torch.distributed.destroy_process_group()
        return 0
    documents = make_documents()
    tokens = {name: int(sum(len(d) for d in docs)) for name, docs in documents.items()}
    cases = single_cases(tokens) + blend_cases(tokens) + unweighted_cases(tokens) + split_cases(tokens)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1
        )
        for name, docs in (documents | {"z": [], "zt": [documents["b"][0], documents["b"][0]]}).items():
            builder = IndexedDatasetBuilder(str(work / f"{name}.bin"), dtype=np.uint16)
            for doc in docs:
                builder.add_item(torch.from_numpy(doc.astype(np.int64)))
                builder.end_document()
            builder.finalize(str(work / f"{name}.idx"))
        for case in cases:
            if case["kind"] == "splits":
                arrays, case["length"] = {}, {}
                for split, dataset in zip(("train", "valid", "test"), build_with_megatron(work, case)):
                    arrays |= dataset_arrays(dataset, f"{split}_")
                    case["length"][split] = len(dataset)
                    count = min(case["num_samples"][split], len(dataset))
                    arrays[f"{split}_tokens"] = served_tokens(dataset, count)
                np.savez_compressed(OUT / f"{case['name']}.npz", **arrays)
                print(
                    f"{case['name']}: N={case['num_samples']} length={case['length']} epochs={case['epochs']}"
                )
                continue
            train = build_with_megatron(work, case)
            arrays = {}
            if case["kind"] == "dataset":
                arrays |= gpt_arrays(train)
            else:
                arrays["dataset_index"] = np.asarray(train.dataset_index, dtype=np.int64)
                arrays["dataset_sample_index"] = np.asarray(train.dataset_sample_index, dtype=np.int64)
                for k, dataset in enumerate(train.datasets):
                    arrays |= gpt_arrays(dataset, f"dataset{k}_")
                case["blend_length"] = len(train)
            case["length"] = len(train)
            arrays["tokens"] = served_tokens(train, min(case["num_samples"], len(train)))
            np.savez_compressed(OUT / f"{case['name']}.npz", **arrays)
            print(
                f"{case['name']}: N={case['num_samples']} length={len(train)} "
                f"epochs={case['epochs']} separate={case['separate_final_epoch']}"
            )
        probes = probe_empty_prefixes(work)
        torch.distributed.destroy_process_group()
    np.savez_compressed(
        OUT / "documents.npz",
        **{
            f"{name}_lengths": np.array([len(d) for d in docs], dtype=np.int32)
            for name, docs in documents.items()
        },
        **{f"{name}_tokens": np.concatenate(docs) for name, docs in documents.items()},
    )
    manifest = {
        "megatron_core": version,
        "generator": "tests/data/make_megatron_fixtures.py",
        "cases": cases,
        "empty_prefix_probes": {
            "seq_length": PROBE_SEQ_LENGTH,
            "valid_samples": PROBE_SAMPLES,
            "blends": EMPTY_PREFIX_PROBES,
            "megatron": probes,
        },
    }
    tmp_manifest = OUT / f".cases.json.{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_manifest, OUT / "cases.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
