import json

import numpy as np
import pytest

from nemotron.data.config import TokenizerConfig
from nemotron.data.tokenizers import TokenizerError, load_tokenizer, resolve_tokenizer


def test_hf_tokenizer_from_dir_and_file(bpe_dir):
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(bpe_dir / "tokenizer.json"))
    eos = raw.token_to_id("</s>")
    for model in (str(bpe_dir), str(bpe_dir / "tokenizer.json")):
        tok = load_tokenizer(TokenizerConfig(model=model))
        assert tok.kind == "huggingface"
        assert tok.eos_id == eos
        ids = tok.encode_batch(["alpha beta", "gamma"])
        assert ids[0] == raw.encode("alpha beta", add_special_tokens=False).ids + [eos]
        assert ids[1][-1] == eos
        assert tok.dtype == np.uint16


def test_bos_eos_settings(bpe_dir):
    bos = load_tokenizer(TokenizerConfig(model=str(bpe_dir), add_bos=True, add_eos=False))
    plain = load_tokenizer(TokenizerConfig(model=str(bpe_dir), add_bos=False, add_eos=False))
    [with_bos], [without] = bos.encode_batch(["alpha"]), plain.encode_batch(["alpha"])
    assert with_bos == [bos.bos_id, *without]
    assert bos.identity() != plain.identity()


def test_sentencepiece_model(sp_model):
    import sentencepiece

    raw = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(TokenizerConfig(model=str(sp_model), add_bos=True, add_eos=True))
    assert tok.kind == "sentencepiece"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.vocab_size == 100
    assert tok.encode_batch(["alpha beta"])[0] == [1, *raw.encode("alpha beta"), 2]
    assert tok.describe()["vocab_size"] == 100


def test_dtype_follows_vocab_size(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(70000)}
    vocab["</s>"] = 70000
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(TokenizerConfig(model=str(tmp_path / "tokenizer.json")))
    assert tok.vocab_size == 70001
    assert tok.dtype == np.int32


def test_identity_changes_with_tokenizer_bytes(bpe_dir, tmp_path):
    original = load_tokenizer(TokenizerConfig(model=str(bpe_dir)))
    data = json.loads((bpe_dir / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzzz"] = len(data["model"]["vocab"]) + 10
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    changed = load_tokenizer(TokenizerConfig(model=str(tmp_path / "tokenizer.json")))
    assert original.identity() == load_tokenizer(TokenizerConfig(model=str(bpe_dir))).identity()
    assert original.identity() != changed.identity()


def test_errors_name_the_problem(tmp_path, bpe_dir):
    with pytest.raises(TokenizerError, match="not found"):
        resolve_tokenizer(TokenizerConfig(model=str(tmp_path / "nope.json")))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        resolve_tokenizer(TokenizerConfig(model=str(tmp_path)))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(TokenizerConfig(model=str(bpe_dir), eos_token="<nonexistent>"))
    with pytest.raises(TokenizerError, match="kind"):
        resolve_tokenizer(TokenizerConfig(model=str(bpe_dir), kind="wordpiece"))
