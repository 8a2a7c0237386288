"""The embedded no-network corpus and tokenizer (nemotron.data.embedded)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nemotron.data import embedded
from nemotron.data.config import DataPrepConfig, TokenizerConfig

SMALL = 60_000  # characters per corpus: enough for a 512-token BPE, built in about a second


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return embedded.materialize(vocab_size=512, cache_dir=tmp_path_factory.mktemp("emb"), corpus_chars=SMALL)


def test_corpora_are_jsonl_text_from_the_stdlib(assets):
    for name in embedded.CORPORA:
        lines = assets.corpora[name].read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) > 5
        assert all(set(r) == {"text"} and r["text"].strip() for r in records)
        assert all(len(r["text"]) <= embedded.MAX_DOC_CHARS for r in records)
        assert SMALL <= sum(len(r["text"]) for r in records) < SMALL + embedded.MAX_DOC_CHARS
    code = assets.corpora["stdlib-code"].read_text()
    assert "def " in code and "import " in code


def test_tokenizer_has_eos_and_round_trips(assets):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(assets.tokenizer))
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(embedded.EOS_TOKEN) == 2 and tok.token_to_id(embedded.BOS_TOKEN) == 1
    text = "def f(x):\n    return x + 1  # übung"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # byte-level: any text survives
    config = json.loads((assets.tokenizer.parent / "tokenizer_config.json").read_text())
    assert config["eos_token"] == embedded.EOS_TOKEN


def test_deterministic_and_cached(assets, tmp_path):
    again = embedded.materialize(vocab_size=512, cache_dir=tmp_path, corpus_chars=SMALL)
    assert again.root.name == assets.root.name  # same cache key
    for name in ("manifest.json", "tokenizer/tokenizer.json", "stdlib-code.jsonl", "stdlib-docstrings.jsonl"):
        assert (again.root / name).read_bytes() == (assets.root / name).read_bytes(), name
    stamp = (again.root / "manifest.json").stat().st_mtime_ns
    embedded.materialize(vocab_size=512, cache_dir=tmp_path, corpus_chars=SMALL)
    assert (again.root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]


def test_the_cached_build_has_the_modes_of_a_plain_mkdir(assets):
    """The build directory came from mkdtemp (0700) and kept that mode when renamed into
    place: a cache shared through NEMOTRON_CACHE_DIR was unreadable to anyone else, whose
    run then rebuilt it and failed at the rename ("Directory not empty")."""
    from nemotron.utils.fs import current_umask

    mask = current_umask()
    assert assets.root.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (assets.root / "tokenizer").stat().st_mode & 0o777 == 0o777 & ~mask
    assert assets.tokenizer.stat().st_mode & 0o777 == 0o666 & ~mask


def test_tokenizer_name_parsing():
    assert embedded.parse_tokenizer_name("embedded://bpe-4096") == 4096
    for bad in ("embedded://bpe", "embedded://wordpiece-4096", "embedded://bpe-12"):
        with pytest.raises(embedded.EmbeddedDataError, match="embedded://bpe-N"):
            embedded.parse_tokenizer_name(bad)


def test_materialize_for_prep_rewrites_uris(tmp_path, monkeypatch, assets):
    monkeypatch.setattr(embedded, "materialize", lambda **kw: assets)
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "local.jsonl").write_text('{"text": "hello"}\n')
    (recipe / "blend.json").write_text(
        json.dumps(
            {
                "datasets": [
                    {"name": "code", "path": "embedded://stdlib-code", "weight": 2.0},
                    {"name": "mine", "path": "local.jsonl", "weight": 1.0},
                    {
                        "name": "hub",
                        "path": "hf://nvidia/Nemotron-CC-v2.1",
                        "subset": "High-Quality",
                        "weight": 1.0,
                    },
                ]
            }
        )
    )
    cfg = DataPrepConfig(blend_path="blend.json", tokenizer=TokenizerConfig(model="embedded://bpe-512"))
    assert embedded.uses_embedded(cfg, recipe)
    work = tmp_path / "job"
    local = embedded.materialize_for_prep(cfg, recipe, work)
    assert local.tokenizer.model == str(assets.tokenizer)
    assert dataclasses.replace(local, tokenizer=cfg.tokenizer, blend_path=cfg.blend_path) == cfg
    entries = json.loads((work / "blend.json").read_text())["datasets"]
    assert local.blend_path == str((work / "blend.json").resolve())
    assert entries[0]["path"] == str(assets.corpora["stdlib-code"]) and entries[0]["weight"] == 2.0
    assert entries[1]["path"] == str((recipe / "local.jsonl").resolve())
    assert entries[2]["path"] == "hf://nvidia/Nemotron-CC-v2.1"


def test_unknown_corpus_is_an_error(tmp_path, monkeypatch, assets):
    monkeypatch.setattr(embedded, "materialize", lambda **kw: assets)
    (tmp_path / "blend.json").write_text(
        json.dumps({"datasets": [{"name": "x", "path": "embedded://wikipedia", "weight": 1.0}]})
    )
    cfg = DataPrepConfig(blend_path=str(tmp_path / "blend.json"))
    with pytest.raises(embedded.EmbeddedDataError, match="unknown embedded corpus 'embedded://wikipedia'"):
        embedded.materialize_for_prep(cfg, tmp_path, tmp_path / "job")


def test_plain_config_is_untouched(tmp_path):
    (tmp_path / "blend.json").write_text(
        json.dumps({"datasets": [{"name": "x", "path": "hf://nvidia/Nemotron-CC-v2", "weight": 1.0}]})
    )
    cfg = DataPrepConfig(blend_path="blend.json")
    assert not embedded.uses_embedded(cfg, tmp_path)
    assert embedded.materialize_for_prep(cfg, tmp_path, tmp_path / "job") == cfg
    assert not (tmp_path / "job").exists()
