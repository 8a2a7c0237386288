"""Tiny tokenizers and corpora for the data tests (built in seconds, no network)."""

from __future__ import annotations

import json
import random

import pytest

WORDS = (
    "the model reads tokens from shards while experts route hidden states through gates "
    "mamba layers scan sequences attention heads look back data flows in blends of weights "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi"
).split()


def make_docs(n: int, seed: int = 0, prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [
        prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + f" {i}" for i in range(n)
    ]


def write_jsonl(path, docs, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for doc in docs:
            handle.write(json.dumps({field: doc, "id": hash(doc) % 1000}) + "\n")
    return path


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json with </s> as EOS and <s> as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("bpe")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(make_docs(300, seed=1), trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    return directory


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece unigram model (bos 1, eos 2)."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(make_docs(400, seed=2)),
        model_prefix=str(directory / "tiny"),
        vocab_size=100,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return directory / "tiny.model"
