"""GPT dataset and blending against a direct (slow, obvious) implementation of Megatron's rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemotron.data.blended import build_blending_indices
from nemotron.data.gpt_dataset import GPTDataset, GPTDatasetError, build_split_dataset
from nemotron.data.indexed import IndexedDatasetError, IndexedDatasetWriter


def write_dataset(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(np.asarray(doc, dtype=dtype))


def random_docs(rng, count, max_len, vocab=1000, allow_empty=False):
    low = 0 if allow_empty else 1
    return [rng.integers(0, vocab, size=int(rng.integers(low, max_len + 1))) for _ in range(count)]


def direct_samples(docs, num_samples, seq_length, seed):
    """Megatron's rules spelled out: epochs, shuffled docs (the last epoch apart when it is
    short), a flat token stream, shuffled samples (the last epoch's apart)."""
    tokens_per_epoch = sum(len(d) for d in docs)
    epochs = 1
    while epochs * tokens_per_epoch < num_samples * seq_length + 1:
        epochs += 1
    before_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    apart = epochs > 1 and num_samples - before_last < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    if apart:
        order = np.array([d for _ in range(epochs - 1) for d in range(len(docs))], dtype=np.int32)
        rng.shuffle(order)
        last = np.arange(len(docs), dtype=np.int32)
        rng.shuffle(last)
        order = np.concatenate([order, last])
    else:
        order = np.array([d for _ in range(epochs) for d in range(len(docs))], dtype=np.int32)
        rng.shuffle(order)
    stream = np.concatenate([np.asarray(docs[d], dtype=np.int64) for d in order])
    count = (len(stream) - 1) // seq_length
    samples = [stream[j * seq_length : j * seq_length + seq_length + 1] for j in range(count)]
    if apart:
        perm = np.arange(before_last, dtype=np.uint32)
        rng.shuffle(perm)
        rest = np.arange(before_last, count, dtype=np.uint32)
        rng.shuffle(rest)
        perm = np.concatenate([perm, rest])
    else:
        perm = np.arange(count, dtype=np.uint32)
        rng.shuffle(perm)
    return [samples[p] for p in perm]


def direct_blend(weights, size):
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    drawn = np.zeros(len(w))
    out = []
    for i in range(size):
        d = int(np.argmax(w * max(i, 1) - drawn))  # argmax returns the first of ties
        out.append((d, int(drawn[d])))
        drawn[d] += 1
    return out


@pytest.mark.parametrize(
    "seed,seq_length,num_samples,allow_empty",
    [(1234, 16, 40, False), (7, 5, 300, True), (0, 64, 3, False), (3, 8, 260, True)],
)
def test_gpt_dataset_matches_direct_rules(tmp_path, seed, seq_length, num_samples, allow_empty):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, 23, 40, allow_empty=allow_empty)
    write_dataset(tmp_path / "shard", docs)
    ds = GPTDataset(str(tmp_path / "shard"), num_samples, seq_length, seed, tmp_path / "cache")
    expected = direct_samples(docs, num_samples, seq_length, seed)
    assert len(ds) == len(expected) >= num_samples
    for i in range(len(ds)):
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), expected[i][:-1])
        np.testing.assert_array_equal(item["labels"].numpy(), expected[i][1:])
        assert item["loss_mask"].shape == (seq_length,) and item["loss_mask"].sum() == seq_length


def test_blending_indices_match_direct_rule():
    for weights, size in [([0.5, 0.3, 0.2], 500), ([1, 1], 77), ([3.0, 1.0, 1.0, 5.0], 1000)]:
        dataset_index, sample_index = build_blending_indices(weights, size)
        assert list(zip(dataset_index.tolist(), sample_index.tolist())) == direct_blend(weights, size)


def test_split_dataset_blends_per_split_json(tmp_path):
    rng = np.random.default_rng(3)
    docs_a, docs_b = random_docs(rng, 30, 30), random_docs(rng, 10, 50)
    write_dataset(tmp_path / "a", docs_a)
    write_dataset(tmp_path / "b", docs_b)
    blend = tmp_path / "blend.json"
    # Relative prefixes resolve beside the blend file; weights may be strings.
    blend.write_text(json.dumps({"train": ["3", "a", "1", str(tmp_path / "b")]}))
    n, s, seed = 61, 8, 99
    ds = build_split_dataset(blend, "train", n, s, seed, tmp_path / "cache")
    # Dataset d serves ceil(n * w_d) samples, is asked for ceil(ceil(n * w_d) * 1.005) (46 ->
    # 47, 16 -> 17), and the blend is as long as the samples served: 46 + 16 = 62 >= n.
    assert len(ds) == 62
    per_dataset = {0: direct_samples(docs_a, 47, s, seed), 1: direct_samples(docs_b, 17, s, seed)}
    for i, (d, k) in enumerate(direct_blend([3, 1], 62)):
        np.testing.assert_array_equal(ds[i]["tokens"].numpy(), per_dataset[d][k][:-1])


def test_megatrons_other_blend_forms_are_read(tmp_path):
    # Megatron's --per-split-data-args-path also takes a split as one whitespace-separated
    # string, and a single prefix without a weight; both were refused.
    rng = np.random.default_rng(4)
    docs_a, docs_b = random_docs(rng, 12, 20), random_docs(rng, 8, 20)
    write_dataset(tmp_path / "a", docs_a)
    write_dataset(tmp_path / "b", docs_b)
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": f"3 {tmp_path / 'a'} 1 {tmp_path / 'b'}", "valid": ["b"]}))
    train = build_split_dataset(blend, "train", 20, 4, 5, tmp_path / "cache")
    per_dataset = {0: direct_samples(docs_a, 16, 4, 5), 1: direct_samples(docs_b, 6, 4, 5)}
    for i, (d, k) in enumerate(direct_blend([3, 1], len(train))):
        np.testing.assert_array_equal(train[i]["tokens"].numpy(), per_dataset[d][k][:-1])
    valid = build_split_dataset(blend, "valid", 5, 4, 5, tmp_path / "cache")
    expected = direct_samples(docs_b, 5, 4, 5)
    assert [valid[i]["tokens"].tolist() for i in range(len(valid))] == [e[:-1].tolist() for e in expected]


def test_a_split_prep_left_empty_is_no_split_for_training(tmp_path):
    # valid_fraction/test_fraction 0 make data prep write "valid": [] and "test": []: training
    # then failed at its first evaluation ("'valid' must be a non-empty list ...").
    from nemotron.train.data import blend_has_split

    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["1", "a"], "valid": [], "test": ""}))
    assert blend_has_split(blend, "train")
    assert not blend_has_split(blend, "valid") and not blend_has_split(blend, "test")
    blend.write_text(json.dumps({"train": ["1", "a"]}))
    assert not blend_has_split(blend, "valid")
    blend.write_text(json.dumps(["1", "a"]))  # malformed: left to build_split_dataset's error
    assert blend_has_split(blend, "valid")


def test_index_cache_is_reused_and_keyed(tmp_path):
    rng = np.random.default_rng(5)
    write_dataset(tmp_path / "a", random_docs(rng, 20, 30))
    cache = tmp_path / "cache"
    first = GPTDataset(str(tmp_path / "a"), 10, 8, 1, cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4  # three index arrays + the description marking completeness
    second = GPTDataset(str(tmp_path / "a"), 10, 8, 1, cache)
    assert sorted(p.name for p in cache.iterdir()) == files
    assert isinstance(second.shuffle_index, np.memmap)
    np.testing.assert_array_equal(first.shuffle_index, second.shuffle_index)
    GPTDataset(str(tmp_path / "a"), 10, 8, 2, cache)  # another seed is another key
    assert len(list(cache.iterdir())) == 8


def _blend_with_a_cold_cache(tmp_path, seed: int):
    """A two-prefix blend, its index cache built cold, and the train samples' tokens read then."""
    rng = np.random.default_rng(seed)
    write_dataset(tmp_path / "a", random_docs(rng, 20, 30))
    write_dataset(tmp_path / "b", random_docs(rng, 20, 30))
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["1", "a", "2", "b"]}))
    cache = tmp_path / "cache"
    cold = build_split_dataset(blend, "train", 10, 8, 1, cache)
    return blend, cache, [cold[i]["tokens"].tolist() for i in range(len(cold))]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "not npy", "empty"])
def test_a_damaged_index_cache_entry_is_built_again(tmp_path, damage):
    # The description marks an entry complete; an array deleted or truncated beside it later
    # (by hand, a full disk) failed every later start with a bare FileNotFoundError/ValueError.
    # It is built again, to the same arrays as a cold cache: the run reads the same samples.
    blend, cache, expected = _blend_with_a_cold_cache(tmp_path, seed=6)
    files = sorted(p.name for p in cache.iterdir())
    # an array of a prefix's entry and one of the blend's
    for array in (sorted(cache.glob("*-shuffle_index.npy"))[0], *cache.glob("*-dataset_index.npy")):
        if damage == "deleted":
            array.unlink()
        elif damage == "truncated":
            with open(array, "r+b") as f:
                f.truncate(array.stat().st_size - 8)
        elif damage == "empty":  # before: a bare "EOFError: No data left in file"
            array.write_bytes(b"")
        else:
            array.write_bytes(b"not an array")
    warm = build_split_dataset(blend, "train", 10, 8, 1, cache)
    assert [warm[i]["tokens"].tolist() for i in range(len(warm))] == expected
    assert sorted(p.name for p in cache.iterdir()) == files  # no stray temporary files


@pytest.mark.parametrize(
    "name", ["document_index", "sample_index", "shuffle_index", "dataset_index", "dataset_sample_index"]
)
@pytest.mark.parametrize("damage", ["empty array", "shorter", "another rank", "floats"])
def test_a_cache_array_of_another_shape_is_built_again(tmp_path, name, damage):
    # A valid .npy of another shape written over an array loaded fine, then failed every start
    # with a bare IndexError/TypeError when a sample was read. It is built again, as a
    # damaged entry is.
    blend, cache, expected = _blend_with_a_cold_cache(tmp_path, seed=16)
    (path,) = sorted(cache.glob(f"*-{name}.npy"))[:1]
    array = np.load(path)
    np.save(
        path,
        {
            "empty array": array[:0],
            "shorter": array[:-1],
            "another rank": array.reshape(-1, 1) if array.ndim == 1 else array[:, 0],
            "floats": array.astype(np.float64),
        }[damage],
    )
    warm = build_split_dataset(blend, "train", 10, 8, 1, cache)
    assert [warm[i]["tokens"].tolist() for i in range(len(warm))] == expected
    assert np.array_equal(np.load(path), array)


def test_blend_errors_name_file_and_entry(tmp_path):
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["1.0", str(tmp_path / "missing")]}))
    with pytest.raises(GPTDatasetError, match=r"blend.json.*train\[1\].*missing"):
        build_split_dataset(blend, "train", 4, 8, 1, tmp_path / "cache")
    with pytest.raises(GPTDatasetError, match="no 'valid' split"):
        build_split_dataset(blend, "valid", 4, 8, 1, tmp_path / "cache")
    # Weights for some prefixes only: Megatron's rule reads neither form; named here.
    blend.write_text(json.dumps({"train": ["1", str(tmp_path / "x"), "heavy", str(tmp_path / "y")]}))
    with pytest.raises(GPTDatasetError, match=r"train\[2\] weight 'heavy' is not a number, but train\[0\]"):
        build_split_dataset(blend, "train", 4, 8, 1, tmp_path / "cache")
    # No entry is a number: prefixes without weights (Megatron's rule), the first one missing.
    blend.write_text(json.dumps({"train": ["heavy", str(tmp_path / "x")]}))
    with pytest.raises(GPTDatasetError, match=r"train\[0\] names 'heavy' but .*heavy.bin does not exist$"):
        build_split_dataset(blend, "train", 4, 8, 1, tmp_path / "cache")


def test_hostile_blend_files_are_one_error_naming_file_and_entry(tmp_path):
    write_dataset(tmp_path / "a", [[1, 2, 3, 4]])
    blend = tmp_path / "blend.json"
    cases = [
        # (file bytes, words of the error); before: a bare UnicodeDecodeError, "weight nan is
        # negative", and weights summing to infinity gave an empty blend.
        (b'{"train": ["1", "a"],\n "valid": ["\xff", "a"]}', r"blend.json: not UTF-8 text at line 2"),
        (b'{"train": ["1", "a",]}', r"blend.json: invalid JSON at line 1 column 21"),
        (b'{"train": ["nan", "a"]}', r"train\[0\] weight 'nan' is not a finite number >= 0"),
        (b'{"train": ["-1", "a"]}', r"train\[0\] weight '-1' is not a finite number >= 0"),
        (b'{"train": [1e308, "a", 1e308, "a"]}', r"the 'train' weights sum to infinity"),
        # before: a bare OverflowError (float() of an integer past a float's range)
        (b'{"train": [1' + b"0" * 400 + b', "a"]}', r"train\[0\] weight 10+ is not a finite number >= 0"),
        (b'{"train": [1' + b"0" * 5000 + b', "a"]}', r"blend.json: invalid JSON \(Exceeds the limit"),
        (
            b'{"train": ["1", "a"], "train": ["1", "a"]}',
            r"blend.json: invalid JSON: key 'train' appears twice",
        ),
        # Odd length: prefixes only (Megatron's rule); "1" is no prefix, likely a lost weight.
        (b'{"train": ["1", "a", "2"]}', r"train\[0\] names '1' but .* a weight without its prefix"),
        (b'{"train": []}', r"non-empty list of weight, prefix pairs"),
        (b'{"train": {"a": 1}}', r"non-empty list of weight, prefix pairs"),
        # before: read as weights 1 and 0, silently
        (b'{"train": [true, "a", 1, "a"]}', r"train\[0\] weight True is not a number, but train\[2\]"),
        # before: ignored, so the valid split was missing (a warning at most)
        (
            b'{"train": ["1", "a"], "vaild": ["1", "a"]}',
            r"blend.json: unknown split 'vaild' \(did you mean 'valid'\?\)",
        ),
    ]
    for raw, words in cases:
        blend.write_bytes(raw)
        with pytest.raises(GPTDatasetError, match=words):
            build_split_dataset(blend, "train", 1, 2, 0, tmp_path / "cache")
    # A prefix whose .idx is a directory: before, "does not exist" after the job dir was made.
    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").mkdir()
    blend.write_text(json.dumps({"train": ["1", "d"]}))
    with pytest.raises(GPTDatasetError, match=r"train\[1\] names 'd' but .*d.idx is not a regular file"):
        build_split_dataset(blend, "train", 1, 2, 0, tmp_path / "cache")


def test_zero_weight_is_never_drawn_and_the_rest_blend_as_without_it():
    # Megatron rejects a zero weight; here its entry is left out of the rule. Before, a leading
    # zero weight won the tie at i = 1 and a sample was read from a dataset never built.
    dataset_index, sample_index = build_blending_indices([0, 1], 5)
    assert dataset_index.tolist() == [1] * 5 and sample_index.tolist() == list(range(5))
    dataset_index, sample_index = build_blending_indices([0.0, 3.0, 0.0, 1.0], 200)
    without = direct_blend([3.0, 1.0], 200)
    assert list(zip(dataset_index.tolist(), sample_index.tolist())) == [
        ({0: 1, 1: 3}[d], k) for d, k in without
    ]


def megatron_walk(docs, num_samples, seq_length, seed):
    """(document_index, sample_index, shuffle_index) built the way Megatron-Core 0.16.1's
    GPTDataset does, step by step (its Python epoch loop, its C++ sample walk with the extra
    token): a second reference, written apart from `direct_samples`, that also pins the arrays."""
    sizes = [len(d) for d in docs]
    tokens = sum(sizes)
    epochs, total = 1, tokens
    while total < num_samples * seq_length + 1:
        epochs, total = epochs + 1, total + tokens
    separate = False
    if epochs > 1:
        sans_final = ((epochs - 1) * tokens - 1) // seq_length
        per_epoch = (tokens - 1) // seq_length
        separate = num_samples - sans_final < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed)

    def doc_index(copies):
        index = np.mgrid[0:copies, 0 : len(docs)][1].reshape(-1).astype(np.int32)
        rng.shuffle(index)
        return index

    document_index = np.concatenate([doc_index(epochs - 1), doc_index(1)]) if separate else doc_index(epochs)
    count = (epochs * tokens - 1) // seq_length
    sample_index = [(0, 0)]
    position, offset = 0, 0
    for _ in range(count):
        remaining = seq_length + 1
        while remaining:
            length = sizes[document_index[position]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                position, offset = position + 1, 0
        sample_index.append((position, offset))

    def shuffle(stop, start=0):
        index = np.arange(start, stop, dtype=np.uint32)
        rng.shuffle(index)
        return index

    shuffle_index = (
        np.concatenate([shuffle(sans_final), shuffle(count, sans_final)]) if separate else shuffle(count)
    )
    return document_index, np.asarray(sample_index, dtype=np.int64), shuffle_index, separate


def megatron_sample(docs, document_index, sample_index, j):
    (beg, beg_offset), (end, end_offset) = sample_index[j], sample_index[j + 1]
    if beg == end:
        return list(docs[document_index[beg]][beg_offset : end_offset + 1])
    parts = list(docs[document_index[beg]][beg_offset:])
    for k in range(beg + 1, end):
        parts += list(docs[document_index[k]])
    return parts + list(docs[document_index[end]][: end_offset + 1])


CORNERS = {
    # name: (documents, seq_length, num_samples)
    "one document, many epochs": ([list(range(1, 11))], 3, 50),
    "seq_length longer than every document": ([[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]], 6, 9),
    # Fewer tokens than one sample: Megatron reads the dataset over several epochs (a sample
    # spans them); this was refused before. E.g. a valid split holding one short document.
    "dataset shorter than one sample": ([[1, 2, 3]], 5, 2),
    "documents shorter, some empty": ([[1], [], [2, 3], [4], []], 16, 7),
    "one token": ([[7]], 2, 3),
    # 10 x 10 tokens, seq 4: 24 samples per epoch, 24 before the 2nd epoch; the last epoch is
    # apart when it gives fewer than int(0.8 * 24) = 19 samples: 42 is apart, 43 is not.
    "final epoch just apart": ([list(range(10 * k, 10 * k + 10)) for k in range(10)], 4, 42),
    "final epoch just not apart": ([list(range(10 * k, 10 * k + 10)) for k in range(10)], 4, 43),
    "many epochs, last apart": ([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 2, 100),
}


@pytest.mark.parametrize("name", sorted(CORNERS))
def test_gpt_dataset_corners_match_megatrons_walk(tmp_path, name):
    docs, seq_length, num_samples = CORNERS[name]
    write_dataset(tmp_path / "shard", docs)
    ds = GPTDataset(str(tmp_path / "shard"), num_samples, seq_length, 17, tmp_path / "cache")
    document_index, sample_index, shuffle_index, separate = megatron_walk(docs, num_samples, seq_length, 17)
    assert ds.separate_final_epoch == separate
    np.testing.assert_array_equal(ds.document_index, document_index)
    np.testing.assert_array_equal(ds.sample_index, sample_index)
    np.testing.assert_array_equal(ds.shuffle_index, shuffle_index)
    assert len(ds) == len(shuffle_index) >= num_samples
    for i in range(len(ds)):
        expected = megatron_sample(docs, document_index, sample_index, int(shuffle_index[i]))
        assert ds.sample_tokens(i).tolist() == expected, i
    if name.startswith("final epoch"):
        assert separate == (name == "final epoch just apart")


def test_empty_dataset_is_an_error_naming_it(tmp_path):
    write_dataset(tmp_path / "shard", [[], []])
    with pytest.raises(GPTDatasetError, match=r"shard has no tokens"):
        GPTDataset(str(tmp_path / "shard"), 4, 8, 1, tmp_path / "cache")


def test_rewritten_shard_with_the_same_sizes_does_not_reuse_stale_indices(tmp_path):
    # Same document count, token count and .bin size, other lengths: the cached indices of the
    # first shard point into the wrong documents of the second (before: an IndexError, or
    # silently other samples).
    first, second = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], [[10], [1, 2, 3, 4], [5, 6], [7, 8, 9]]
    write_dataset(tmp_path / "shard", first)
    GPTDataset(str(tmp_path / "shard"), 3, 2, 0, tmp_path / "cache")
    write_dataset(tmp_path / "shard", second)
    ds = GPTDataset(str(tmp_path / "shard"), 3, 2, 0, tmp_path / "cache")
    expected = direct_samples(second, 3, 2, 0)
    assert [ds.sample_tokens(i).tolist() for i in range(len(ds))] == [e.tolist() for e in expected]


def test_float_token_file_is_refused_naming_it(tmp_path):
    # The indexed format has float codes; read as tokens their values would be truncated to ids
    # (and pass the vocabulary check).
    write_dataset(tmp_path / "shard", [[1.5, 2.25, 3.0, 4.0]], dtype=np.float32)
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["1", str(tmp_path / "shard")]}))
    with pytest.raises(IndexedDatasetError, match=r"shard\.idx: dtype float32 is not a token dtype"):
        build_split_dataset(blend, "train", 1, 2, 0, tmp_path / "cache", vocab_size=100)


def test_unigram_entropy_of_prefixes_without_weights_weighs_them_by_size(tmp_path):
    # Prefixes without weights are each read once (Megatron): the unigram mixture weighs them
    # by their tokens. Before, the unweighted form was refused before any entropy was taken.
    from nemotron.train.data import unigram_entropy

    write_dataset(tmp_path / "a", [[1, 1, 2]])  # 3 tokens
    write_dataset(tmp_path / "b", [[3]] * 6)  # 6 tokens
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["a", "b"]}))
    p = np.array([2, 1, 6]) / 9.0  # token 1: 2 of 9, token 2: 1 of 9, token 3: 6 of 9
    assert unigram_entropy(blend) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_a_prefix_without_weight_too_short_for_one_sample_is_named(tmp_path):
    # Read once (a blend without weights), a prefix shorter than one sample holds none;
    # Megatron fails on an assertion, here one error names the prefix.
    write_dataset(tmp_path / "a", [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    write_dataset(tmp_path / "tiny", [[1, 2, 3]])
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": f"{tmp_path / 'a'} {tmp_path / 'tiny'}"}))
    with pytest.raises(GPTDatasetError, match=r"dataset \S*tiny has 3 tokens: read once .* seq_length 4"):
        build_split_dataset(blend, "train", 2, 4, 0, tmp_path / "cache")


def test_unigram_entropy_counts_only_the_train_share_of_a_one_blend_file(tmp_path):
    # A file of one blend for every split is cut by data.split: training reads documents
    # [0, round(0.5 * 4)) of each prefix under "50,50,0". The entropy counted every document.
    from nemotron.train.data import unigram_entropy

    write_dataset(tmp_path / "a", [[1, 1], [2, 1], [7, 7, 7], [7, 8]])  # train: 1 1 2 1
    write_dataset(tmp_path / "b", [[3, 3], [3, 4], [9], [9, 9]])  # train: 3 3 3 4
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps(["3", "a", "1", "b"]))

    def entropy(*counts_and_weights):
        mixture = np.zeros(10)
        for counts, weight in counts_and_weights:
            counts = np.pad(np.asarray(counts, dtype=np.float64), (0, 10 - len(counts)))
            mixture += np.asarray(counts, dtype=np.float64) / sum(counts) * weight
        nz = mixture[mixture > 0]
        return float(-(nz * np.log(nz)).sum())

    train = entropy(([0, 3, 1, 0, 0], 0.75), ([0, 0, 0, 3, 1], 0.25))
    assert unigram_entropy(blend, split_string="50,50,0") == pytest.approx(train, rel=1e-12)
    # valid reads the other halves: tokens 7, 8 and 9 only
    valid = -(0.75 * (4 / 5) * np.log(0.75 * 4 / 5) + 0.75 / 5 * np.log(0.75 / 5) + 0.25 * np.log(0.25))
    assert unigram_entropy(blend, "valid", split_string="50,50,0") == pytest.approx(valid, rel=1e-12)
    assert unigram_entropy(blend, "test", split_string="50,50,0") is None  # no share: nothing read
    # A per-split file: every document of the split's prefixes, as before.
    blend.write_text(json.dumps({"train": ["1", "a"]}))
    assert unigram_entropy(blend) == pytest.approx(entropy(([0, 3, 1, 0, 0, 0, 0, 4, 1], 1.0)), rel=1e-12)


def test_unigram_entropy_reads_sequences_where_the_index_places_them(tmp_path):
    # The index may place sequences anywhere in the .bin (not back to back): only the tokens
    # of the sequences count, not the bytes between them.
    from nemotron.data.indexed import IndexedDataset
    from nemotron.train.data import unigram_entropy

    write_dataset(tmp_path / "a", [[1, 2], [3, 3]])
    ds = IndexedDataset(tmp_path / "a")
    index = bytearray((tmp_path / "a.idx").read_bytes())
    pointers_at = index.find(np.asarray(ds.sequence_pointers, dtype="<i8").tobytes())
    del ds
    # sequence 1 now starts one token later: reads [3] plus a 99 appended at the end
    (tmp_path / "a.bin").write_bytes(
        (tmp_path / "a.bin").read_bytes() + np.asarray([99], np.uint16).tobytes()
    )
    index[pointers_at + 8 : pointers_at + 16] = np.asarray([6], dtype="<i8").tobytes()
    (tmp_path / "a.idx").write_bytes(bytes(index))
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["a"]}))
    p = np.array([1, 1, 1, 1]) / 4.0  # tokens 1, 2, 3 and 99 once each; the first 3 skipped
    assert unigram_entropy(blend) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_unigram_counts_of_sequences_placed_apart_are_gathered_not_read_one_by_one(tmp_path, monkeypatch):
    # Sequences with junk tokens between them (the index allows gaps): every sequence's tokens count,
    # the junk does not (reference: each sequence read by its own pointer); the reads are
    # gathered into parts of at most _GATHER_TOKENS tokens, one count each (one count per
    # sequence took minutes for a million short documents), a longer sequence a part alone.
    from nemotron.data.indexed import IndexedDataset
    from nemotron.train import data as train_data

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50, size=int(n)).tolist() for n in rng.integers(1, 6, size=40)] + [[7] * 30]
    write_dataset(tmp_path / "a", docs)
    ds = IndexedDataset(tmp_path / "a")
    index = bytearray((tmp_path / "a.idx").read_bytes())
    pointers_at = index.find(np.asarray(ds.sequence_pointers, dtype="<i8").tobytes())
    del ds
    body, pointers = [], [0] * len(docs)
    for i in range(len(docs)):
        body += [999] * (i % 3 + 1)  # junk the index does not point at
        pointers[i] = 2 * len(body)
        body += docs[i]
    (tmp_path / "a.bin").write_bytes(np.asarray(body, np.uint16).tobytes())
    index[pointers_at : pointers_at + 8 * len(docs)] = np.asarray(pointers, dtype="<i8").tobytes()
    (tmp_path / "a.idx").write_bytes(bytes(index))

    monkeypatch.setattr(train_data, "_GATHER_TOKENS", 16)
    calls = []
    bincount = np.bincount
    monkeypatch.setattr(np, "bincount", lambda x, *a, **k: calls.append(len(x)) or bincount(x, *a, **k))
    ds = IndexedDataset(tmp_path / "a")
    for first, stop in ((0, len(docs)), (3, 17), (40, 41)):
        calls.clear()
        counts = train_data._token_counts(ds, first, stop)
        expected = bincount(np.concatenate([np.asarray(d, dtype=np.int64) for d in docs[first:stop]]))
        np.testing.assert_array_equal(counts, expected.astype(np.float64), err_msg=f"{first}:{stop}")
        tokens = sum(len(d) for d in docs[first:stop])
        assert len(calls) <= -(-tokens // 16), (first, stop, calls)  # parts, not sequences
    assert calls == [30]  # the long sequence alone


@pytest.mark.parametrize(
    "array, index, value",
    [
        ("shuffle_index", 0, 10**6),
        ("sample_index", 2, -3),  # numpy would take a document from the end, silently
        ("sample_index", 1, -3),
        ("document_index", 0, 30000),
        ("dataset_index", 0, 7),
    ],
)
def test_an_index_cache_entry_pointing_outside_the_data_is_named(tmp_path, array, index, value):
    """A cached array overwritten in place with a value outside the data (valid .npy, so it is
    loaded): the sample read is one error naming the cache entry and how to rebuild it, not a
    bare IndexError (or another sample, silently)."""
    rng = np.random.default_rng(7)
    write_dataset(tmp_path / "a", random_docs(rng, 20, 30))
    write_dataset(tmp_path / "b", random_docs(rng, 20, 30))
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["1", "a", "2", "b"]}))
    cache = tmp_path / "cache"
    build_split_dataset(blend, "train", 10, 8, 1, cache)
    for path in cache.glob(f"*-{array}.npy"):
        values = np.load(path).copy()
        values.flat[index] = value
        np.save(path, values)
    warm = build_split_dataset(blend, "train", 10, 8, 1, cache)
    with pytest.raises(
        GPTDatasetError, match=r"index cache entry .*-description\.json is damaged: .*delete it"
    ):
        for dataset in (warm, *warm.datasets):  # every sample of each, not only those the blend draws
            for i in range(len(dataset)):
                dataset[i]


@pytest.mark.parametrize(
    "num_samples, seq_length",
    [(5, 16), (40, 16), (70, 16), (3, 200)],  # one epoch; several; a separate last; a sample > epoch
)
def test_the_index_memory_bound_is_the_arrays_built(tmp_path, monkeypatch, num_samples, seq_length):
    """The bytes checked before a build are exactly those of the arrays it keeps, array by
    array: a machine with that much memory builds it, one with a byte less is refused first
    (nothing allocated, no cache entry written)."""
    from nemotron.data import gpt_dataset

    prefix = str(tmp_path / "d")
    write_dataset(prefix, random_docs(np.random.default_rng(1), 12, 30))
    built = GPTDataset(prefix, num_samples, seq_length, 3, tmp_path / "cache")
    arrays = (built.document_index, built.sample_index, built.shuffle_index)
    needed = sum(a.nbytes for a in arrays)
    assert built.sample_index.shape == (len(built.shuffle_index) + 1, 2)
    monkeypatch.setattr(gpt_dataset, "physical_memory", lambda: needed - 1)
    with pytest.raises(gpt_dataset.IndexTooLargeError, match=rf"asked for {num_samples} samples"):
        GPTDataset(prefix, num_samples, seq_length, 3, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    GPTDataset(prefix, num_samples, seq_length, 3, tmp_path / "cache")  # cached: nothing to build
    monkeypatch.setattr(gpt_dataset, "physical_memory", lambda: needed)
    GPTDataset(prefix, num_samples, seq_length, 3, tmp_path / "third")


def test_the_blend_index_memory_bound_is_the_arrays_built(tmp_path, monkeypatch):
    from nemotron.data import gpt_dataset
    from nemotron.data.blended import BlendedDataset

    prefixes = [str(tmp_path / "a"), str(tmp_path / "b")]
    for k, prefix in enumerate(prefixes):
        write_dataset(prefix, random_docs(np.random.default_rng(k), 30, 40))
    blend = BlendedDataset.build(prefixes, [0.3, 0.7], 50, 8, 1, tmp_path / "cache", "train")
    needed = blend.dataset_index.nbytes + blend.dataset_sample_index.nbytes
    assert len(blend.dataset_index) == len(blend) == 50
    blend.cache_marker.unlink()  # the blend's entry to build again; its datasets' stay cached
    monkeypatch.setattr(gpt_dataset, "physical_memory", lambda: needed - 1)
    with pytest.raises(gpt_dataset.IndexTooLargeError, match="a blend of 2 datasets asked for 50 samples"):
        BlendedDataset.build(prefixes, [0.3, 0.7], 50, 8, 1, tmp_path / "cache", "train")
    monkeypatch.setattr(gpt_dataset, "physical_memory", lambda: needed)
    assert len(BlendedDataset.build(prefixes, [0.3, 0.7], 50, 8, 1, tmp_path / "cache", "train")) == 50


def test_a_sample_count_absurd_for_the_data_is_refused_at_once(tmp_path):
    """10**15 samples of a 12-document dataset: a MemoryError (or the kernel's OOM killer
    hours later) before; one error naming the dataset and the count now, in milliseconds."""
    prefix = str(tmp_path / "d")
    write_dataset(prefix, random_docs(np.random.default_rng(1), 12, 30))
    with pytest.raises(
        GPTDatasetError, match=rf"dataset {prefix} asked for 10+ samples of seq_length 16 .*GiB"
    ):
        GPTDataset(prefix, 10**15, 16, 3, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
