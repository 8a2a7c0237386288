"""Tokenizers for data preparation: Hugging Face ``tokenizers`` and SentencePiece.

``resolve_tokenizer(cfg)`` turns a :class:`TokenizerConfig` into local files (downloading a hub
tokenizer at a pinned commit when ``model`` is a hub id) and is done once, in the parent
process. ``load_tokenizer(resolved)`` builds the encoder from those files and is cheap enough to
repeat in every worker process. The identity hash covers the tokenizer files' bytes and the
BOS/EOS settings, so any change that alters token ids changes the data-prep fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nemotron.data.config import TokenizerConfig
from nemotron.data.indexed import token_dtype_for_vocab

KINDS = ("auto", "huggingface", "sentencepiece")
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be found, loaded, or lacks a configured special token."""


@dataclass(frozen=True)
class ResolvedTokenizer:
    """Local files of a tokenizer plus the settings that shape its output (picklable)."""

    kind: str  # huggingface | sentencepiece
    path: str  # tokenizer.json or .model file
    config_path: str | None  # tokenizer_config.json beside it, if any
    source: str  # what the user configured
    revision: str | None  # resolved hub commit, or None for local files
    add_bos: bool
    add_eos: bool
    bos_token: str | None
    eos_token: str | None


def _detect_local(path: Path, kind: str) -> tuple[str, Path] | None:
    if path.is_file():
        if kind == "sentencepiece" or (kind == "auto" and path.suffix == ".model"):
            return "sentencepiece", path
        return "huggingface", path
    if path.is_dir():
        hf_file, sp_file = path / "tokenizer.json", path / "tokenizer.model"
        if kind in ("auto", "huggingface") and hf_file.is_file():
            return "huggingface", hf_file
        if kind in ("auto", "sentencepiece") and sp_file.is_file():
            return "sentencepiece", sp_file
        raise TokenizerError(f"tokenizer directory {path} has no tokenizer.json or tokenizer.model")
    return None


def _download_from_hub(repo: str, revision: str | None, kind: str) -> tuple[str, Path, Path | None, str]:
    # Imported where used: the config schema imports this module (CLI start-up, dry runs)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        commit: str | None
        if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
            commit = revision  # already a commit: no hub call (works offline from the cache)
        else:
            commit = HfApi().model_info(repo, revision=revision).sha
    except Exception as error:  # network, auth or missing repo: say which tokenizer
        raise TokenizerError(f"cannot resolve tokenizer {repo!r} on the Hugging Face hub: {error}") from error
    if commit is None:
        raise TokenizerError(f"cannot resolve tokenizer {repo!r} on the Hugging Face hub: it gave no commit")
    names = (
        ["tokenizer.json", "tokenizer.model"]
        if kind == "auto"
        else (["tokenizer.json"] if kind == "huggingface" else ["tokenizer.model"])
    )
    for name in names:
        try:
            file = Path(hf_hub_download(repo, name, revision=commit))
        except EntryNotFoundError:
            continue
        try:
            config = Path(hf_hub_download(repo, "tokenizer_config.json", revision=commit))
        except EntryNotFoundError:
            config = None
        return ("huggingface" if name.endswith(".json") else "sentencepiece"), file, config, commit
    raise TokenizerError(f"hub repo {repo!r}@{commit} has no {' or '.join(names)}")


def resolve_tokenizer(cfg: TokenizerConfig) -> ResolvedTokenizer:
    if cfg.kind not in KINDS:
        raise TokenizerError(f"tokenizer.kind must be one of {KINDS}, got {cfg.kind!r}")
    local = _detect_local(Path(cfg.model).expanduser(), cfg.kind)
    config: Path | None
    if local is not None:
        kind, file = local
        config = file.parent / "tokenizer_config.json"
        config_path, revision = (str(config) if config.is_file() else None), None
    else:
        looks_local = cfg.model.startswith(("/", ".", "~")) or cfg.model.endswith((".json", ".model"))
        if looks_local or cfg.model.count("/") != 1:
            raise TokenizerError(f"tokenizer file or directory not found: {cfg.model}")
        kind, file, config, revision = _download_from_hub(cfg.model, cfg.revision, cfg.kind)
        config_path = str(config) if config else None
    return ResolvedTokenizer(
        kind=kind,
        path=str(Path(file).resolve()),
        config_path=config_path,
        source=cfg.model,
        revision=revision,
        add_bos=cfg.add_bos,
        add_eos=cfg.add_eos,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
    )


def _configured_special(config_path: str | None, key: str) -> str | None:
    if not config_path:
        return None
    try:
        value = json.loads(Path(config_path).read_text()).get(key)
    except (OSError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{config_path}: cannot read {key}: {error}") from error
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encodes batches of text to token ids with BOS/EOS applied as configured."""

    def __init__(self, resolved: ResolvedTokenizer):
        self.resolved = resolved
        self.kind = resolved.kind
        if resolved.kind == "huggingface":
            from tokenizers import Tokenizer as HFTokenizer  # not on the config path

            try:
                self._hf = HFTokenizer.from_file(resolved.path)
            except Exception as error:
                raise TokenizerError(
                    f"{resolved.path}: not a Hugging Face tokenizer.json: {error}"
                ) from error
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.bos_id = self._special_id(resolved.bos_token, "bos_token", _BOS_CANDIDATES, resolved.add_bos)
            self.eos_id = self._special_id(resolved.eos_token, "eos_token", _EOS_CANDIDATES, resolved.add_eos)
            self._fast = hasattr(self._hf, "encode_batch_fast")
        else:
            import sentencepiece  # not on the config path

            self._sp = sentencepiece.SentencePieceProcessor()
            try:
                self._sp.Load(resolved.path)
            except Exception as error:
                raise TokenizerError(f"{resolved.path}: not a SentencePiece model: {error}") from error
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id = self._sp_special(resolved.bos_token, self._sp.bos_id(), "bos", resolved.add_bos)
            self.eos_id = self._sp_special(resolved.eos_token, self._sp.eos_id(), "eos", resolved.add_eos)
        self.dtype = np.dtype(token_dtype_for_vocab(self.vocab_size))

    def _special_id(self, explicit, config_key, candidates, required) -> int | None:
        text = explicit or _configured_special(self.resolved.config_path, config_key)
        names = [text] if text else list(candidates)
        for name in names:
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        if text:
            raise TokenizerError(f"{self.resolved.path}: {config_key} {text!r} is not in the vocabulary")
        if required:
            raise TokenizerError(
                f"{self.resolved.path}: no {config_key} found (tried {', '.join(candidates)}); "
                f"set tokenizer.{config_key}"
            )
        return None

    def _sp_special(self, explicit, builtin, name, required) -> int | None:
        if explicit:
            token_id = self._sp.piece_to_id(explicit)
            if token_id == self._sp.unk_id() and explicit != self._sp.id_to_piece(token_id):
                raise TokenizerError(
                    f"{self.resolved.path}: {name}_token {explicit!r} is not in the vocabulary"
                )
            return token_id
        if builtin >= 0:
            return builtin
        if required:
            raise TokenizerError(f"{self.resolved.path}: the SentencePiece model defines no {name} token")
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "huggingface":
            encodings = (
                self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
                if self._fast
                else self._hf.encode_batch(list(texts), add_special_tokens=False)
            )
            batch = [encoding.ids for encoding in encodings]
        else:
            batch = self._sp.encode(list(texts), out_type=int, num_threads=1)
        if self.resolved.add_bos and self.bos_id is not None:
            batch = [[self.bos_id, *ids] for ids in batch]
        if self.resolved.add_eos and self.eos_id is not None:
            for ids in batch:
                ids.append(self.eos_id)
        return batch

    def identity(self) -> str:
        """Hash of the tokenizer files and the settings that change token ids."""
        if getattr(self, "_identity", None) is None:
            self._identity = self._compute_identity()
        return self._identity

    def _compute_identity(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.kind.encode())
        digest.update(Path(self.resolved.path).read_bytes())
        settings = {
            "add_bos": self.resolved.add_bos,
            "add_eos": self.resolved.add_eos,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        """What metadata.json records about the tokenizer."""
        info = asdict(self.resolved)
        info.update(
            vocab_size=self.vocab_size,
            dtype=self.dtype.name,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            identity=self.identity(),
        )
        return info


def load_tokenizer(resolved: ResolvedTokenizer | TokenizerConfig) -> Tokenizer:
    if isinstance(resolved, TokenizerConfig):
        resolved = resolve_tokenizer(resolved)
    return Tokenizer(resolved)
