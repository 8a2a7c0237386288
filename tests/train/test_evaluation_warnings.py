"""A run asking for evaluation (train.eval_iters > 0) of a blend without a valid or test split
is told so, naming the keys, at its start and in the dry run (`evaluation_warnings`). Megatron
runs such a configuration without a word; before, so did this project."""

from __future__ import annotations

import json

import numpy as np

from nemotron.data.config import DataConfig
from nemotron.data.indexed import IndexedDatasetWriter
from nemotron.train.config import TrainConfig
from nemotron.train.data import TrainingData, plan_batches
from nemotron.train.plan import evaluation_warnings


def _prefix(root, name="p", docs=40):
    with IndexedDatasetWriter(root / name, np.uint16) as writer:
        for k in range(docs):
            writer.add_document(np.arange(k, k + 30, dtype=np.uint16) % 50)
    return str(root / name)


def _train(**kw):
    values = dict(train_iters=4, global_batch_size=2, micro_batch_size=2, seq_length=8)
    values.update(kw)
    return TrainConfig(**values)


def test_each_missing_split_is_named_with_the_keys(tmp_path):
    single = tmp_path / "one.json"
    single.write_text(json.dumps([_prefix(tmp_path)]))
    train = _train(eval_iters=3, eval_interval=2)

    def warnings(blend, split=None, **kw):
        return evaluation_warnings(DataConfig(blend=str(blend), split=split, **kw), train)

    (valid, test) = warnings(single, "100,0,0")
    assert valid.startswith(f"data.split '100,0,0' gives data.blend {single} no valid share: ")
    assert "train.eval_iters=3" in valid and "train.eval_interval=2" in valid
    assert "nor after the last step" in valid and "train.eval_iters=0" in valid
    assert test.startswith(f"data.split '100,0,0' gives data.blend {single} no test share: ")
    assert "the test pass after the last step is skipped" in test
    (only_test,) = warnings(single, "99,1,0")
    assert "no test share" in only_test
    assert warnings(single) == []  # Megatron's default split gives every split a share
    assert warnings(single, "98,1,1") == []
    per_split = tmp_path / "blend.json"
    per_split.write_text(json.dumps({"train": ["1", _prefix(tmp_path)], "valid": [], "test": ["p"]}))
    (valid,) = warnings(per_split)
    assert valid.startswith(f'data.blend {per_split} has an empty "valid" split: with train.eval_iters=3')
    # Evaluation off, or synthetic tokens (which have every split): nothing to say.
    assert evaluation_warnings(DataConfig(blend=str(single), split="100,0,0"), _train(eval_iters=0)) == []
    assert evaluation_warnings(DataConfig(mock=True, split="100,0,0"), train) == []


def test_the_run_start_says_it(tmp_path):
    single = tmp_path / "one.json"
    single.write_text(json.dumps([_prefix(tmp_path)]))
    train = _train(eval_iters=1, eval_interval=2)
    data_cfg = DataConfig(blend=str(single), split="100,0,0", cache_dir=str(tmp_path / "cache"))
    data = TrainingData(data_cfg, train, plan_batches(train), vocab_size=64)
    said = data.open_datasets()
    assert data.eval_dataset("valid") is None and data.eval_dataset("test") is None
    assert said == evaluation_warnings(data_cfg, train) and len(said) == 2
    data.close()


def test_a_run_of_a_one_blend_file_without_valid_share_warns_and_counts_its_train_share(tmp_path):
    """Through `pretrain`: the warnings reach the summary, and the summary's unigram entropy is
    that of the documents data.split gives train (the whole files' before)."""
    from nemotron.train import pretrain
    from nemotron.train.data import unigram_entropy

    from .conftest import make_config, markov_docs, write_prefix

    rng = np.random.default_rng(0)
    # The first half of the documents shift by 3, the second by 5: other token statistics.
    write_prefix(tmp_path / "p", markov_docs(rng, 30, 3) + markov_docs(rng, 30, 5))
    blend = tmp_path / "one.json"
    blend.write_text(json.dumps([str(tmp_path / "p")]))
    cfg = make_config(tmp_path, blend=blend, train={"train_iters": 1}, data={"split": "50,0,50"})
    summary = pretrain(cfg, tmp_path / "job")
    assert summary.valid_loss is None and summary.test_loss is not None
    (said,) = [w for w in summary.warnings if "train.eval_iters=1" in w]
    assert said.startswith(f"data.split '50,0,50' gives data.blend {blend} no valid share")
    assert summary.unigram_entropy == unigram_entropy(blend, split_string="50,0,50")
    assert summary.unigram_entropy != unigram_entropy(blend, split_string="100,0,0")
