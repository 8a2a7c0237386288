"""The embedded default data: a text corpus and a tokenizer built at run time, with no network.

Nothing third-party is shipped in the repository. The corpus is generated from the installed
Python standard library (its docstrings as prose, its sources as code), and a small byte-level
BPE (EOS `</s>`) is trained on that corpus with Hugging Face `tokenizers`. Both are written under
a cache directory keyed by everything that shapes them, so they are built once and reused; the
same Python install gives byte-identical files.

Recipes name them with `embedded://` URIs:
  - `embedded://stdlib-docstrings`, `embedded://stdlib-code`: blend entries (`path`), each a
    local jsonl file with one `{"text": ...}` record per document;
  - `embedded://bpe-N`: a tokenizer of vocabulary size N (`tokenizer.model`).
`materialize_for_prep(cfg, recipe_dir, work_dir)` returns a DataPrepConfig in which every such
URI is replaced by the local path (the blend JSON is rewritten into `work_dir`), which is what
the CLI does before calling `nemotron.data.prep.run_data_prep`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from nemotron.data.config import DataPrepConfig
from nemotron.utils.fs import apply_default_modes, atomic_write_text, temporary_dir

SCHEME = "embedded://"
CORPORA = ("stdlib-docstrings", "stdlib-code")
EOS_TOKEN = "</s>"
BOS_TOKEN = "<s>"
UNK_TOKEN = "<unk>"
# Bump when the generator changes what it writes: it is part of the cache key.
GENERATOR_VERSION = 1
DEFAULT_CORPUS_CHARS = 2_000_000  # per corpus: ~1M tokens in all with a 4K BPE
MAX_DOC_CHARS = 3_000
MIN_DOCSTRING_CHARS = 80
# Not representative of ordinary Python text (tests, tables, demos, vendored code).
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "encodings",
    "__pycache__",
    "ensurepip",
    "config-3",
    "pydoc_data",
}


class EmbeddedDataError(ValueError):
    """An unknown `embedded://` name, or a Python install without standard-library sources."""


@dataclass(frozen=True)
class EmbeddedAssets:
    root: Path
    corpora: dict[str, Path]  # name -> jsonl
    tokenizer: Path  # tokenizer.json (tokenizer_config.json beside it names the specials)
    vocab_size: int


def default_cache_dir() -> Path:
    env = os.environ.get("NEMOTRON_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "nemotron"
    return base / "embedded"


def is_embedded(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_tokenizer_name(uri: str) -> int:
    """`embedded://bpe-4096` -> 4096."""
    name = uri.removeprefix(SCHEME)
    prefix, _, size = name.partition("-")
    if prefix != "bpe" or not size.isdigit() or not 256 < int(size) <= 65_000:
        raise EmbeddedDataError(
            f"unknown embedded tokenizer {uri!r}: expected embedded://bpe-N with 256 < N <= 65000"
        )
    return int(size)


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "os.py").is_file():
        raise EmbeddedDataError(f"no Python standard-library sources under {path}")
    return path


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _split(text: str, limit: int) -> list[str]:
    """Split at blank lines into pieces of at most `limit` characters (longer paragraphs cut)."""
    pieces, current = [], ""
    for block in text.split("\n\n"):
        while len(block) > limit:
            pieces.append(block[:limit])
            block = block[limit:]
        if current and len(current) + 2 + len(block) > limit:
            pieces.append(current)
            current = block
        else:
            current = f"{current}\n\n{block}" if current else block
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def _documents(root: Path) -> dict[str, list[str]]:
    """All candidate documents, in a deterministic order, per corpus."""
    docs: dict[str, list[str]] = {name: [] for name in CORPORA}
    for file in _stdlib_files(root):
        try:
            source = file.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        docstrings = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docstrings.append(doc.strip())
        if docstrings:
            docs["stdlib-docstrings"].extend(_split("\n\n".join(docstrings), MAX_DOC_CHARS))
        docs["stdlib-code"].extend(_split(source, MAX_DOC_CHARS))
    return docs


def _cache_key(root: Path, corpus_chars: int, vocab_size: int) -> str:
    facts = {
        "generator": GENERATOR_VERSION,
        "python": sys.version,
        "stdlib": str(root),
        "corpus_chars": corpus_chars,
        "vocab_size": vocab_size,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _write_corpora(directory: Path, root: Path, corpus_chars: int) -> dict[str, Path]:
    paths = {}
    for name, documents in _documents(root).items():
        path = directory / f"{name}.jsonl"
        used = 0
        with path.open("w", encoding="utf-8") as out:
            for text in documents:
                if used >= corpus_chars:
                    break
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                used += len(text)
        paths[name] = path
    return paths


def _iter_texts(paths: list[Path]):
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train_tokenizer(corpus_files: list[Path], vocab_size: int, directory: Path) -> Path:
    """Train a byte-level BPE on the corpus; write tokenizer.json + tokenizer_config.json."""
    # only when the embedded default data is first built (once per machine)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],  # ids 0, 1, 2 as in Nemotron's tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_texts(corpus_files), trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "model_max_length": 1_000_000,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def _assets_dir(vocab_size: int, cache_dir: str | Path | None, corpus_chars: int) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / _cache_key(stdlib_dir(), corpus_chars, vocab_size)


def is_materialized(
    vocab_size: int = 4096, cache_dir: str | Path | None = None, corpus_chars: int = DEFAULT_CORPUS_CHARS
) -> bool:
    """Whether `materialize` would reuse a complete cached build (and so build nothing)."""
    return (_assets_dir(vocab_size, cache_dir, corpus_chars) / "manifest.json").is_file()


def prep_vocab_size(cfg: DataPrepConfig) -> int:
    """The embedded tokenizer's vocabulary size a data-prep config asks for (4096 if it names
    only embedded corpora)."""
    return parse_tokenizer_name(cfg.tokenizer.model) if is_embedded(cfg.tokenizer.model) else 4096


def materialize(
    vocab_size: int = 4096, cache_dir: str | Path | None = None, corpus_chars: int = DEFAULT_CORPUS_CHARS
) -> EmbeddedAssets:
    """Build (or reuse) the embedded corpora and tokenizer; safe against interrupted builds."""
    root = stdlib_dir()
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = _assets_dir(vocab_size, base, corpus_chars)
    manifest = final / "manifest.json"
    if not manifest.is_file():
        tmp = temporary_dir(final, sweep=True)  # (what killed builds left there goes first)
        try:
            corpora = _write_corpora(tmp, root, corpus_chars)
            train_tokenizer([corpora[n] for n in CORPORA], vocab_size, tmp / "tokenizer")
            info = {
                "python": sys.version,
                "stdlib": str(root),
                "corpus_chars": corpus_chars,
                "vocab_size": vocab_size,
                "generator": GENERATOR_VERSION,
                "files": {
                    p.relative_to(tmp).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file()
                },
            }
            (tmp / "manifest.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            apply_default_modes(tmp)  # made 0700: a shared cache would be private
            try:
                tmp.rename(final)
            except OSError:
                if not manifest.is_file():  # not a concurrent build that finished first
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddedAssets(
        root=final,
        corpora={name: final / f"{name}.jsonl" for name in CORPORA},
        tokenizer=final / "tokenizer" / "tokenizer.json",
        vocab_size=vocab_size,
    )


def _blend_file(cfg: DataPrepConfig, recipe_dir: Path) -> Path:
    path = Path(cfg.blend_path).expanduser()
    return path if path.is_absolute() else Path(recipe_dir) / path


def uses_embedded(cfg: DataPrepConfig, recipe_dir: str | Path) -> bool:
    """Whether the config (tokenizer or any blend entry) names an `embedded://` asset."""
    if is_embedded(cfg.tokenizer.model):
        return True
    blend = _blend_file(cfg, Path(recipe_dir))
    try:
        data = json.loads(blend.read_text())
    except (OSError, ValueError):
        return False  # data prep reports the unreadable blend itself
    entries = data.get("datasets", []) if isinstance(data, dict) else []
    return any(isinstance(e, dict) and is_embedded(e.get("path")) for e in entries)


def materialize_for_prep(
    cfg: DataPrepConfig, recipe_dir: str | Path, work_dir: str | Path, cache_dir: str | Path | None = None
) -> DataPrepConfig:
    """A copy of `cfg` with every `embedded://` URI replaced by a local path.

    A blend that names embedded corpora is rewritten to `work_dir/<blend name>` with the jsonl
    paths filled in; `blend_path` then points at it (absolute). Other entries are kept as they are
    (relative local paths made absolute against `recipe_dir`).
    """
    recipe_dir = Path(recipe_dir)
    vocab_size = prep_vocab_size(cfg)
    assets: EmbeddedAssets | None = None

    def get_assets() -> EmbeddedAssets:
        nonlocal assets
        if assets is None:
            assets = materialize(vocab_size=vocab_size, cache_dir=cache_dir)
        return assets

    tokenizer = cfg.tokenizer
    if is_embedded(tokenizer.model):
        tokenizer = dataclasses.replace(tokenizer, model=str(get_assets().tokenizer))
    blend_path = cfg.blend_path
    blend = _blend_file(cfg, recipe_dir)
    try:
        data = json.loads(blend.read_text())
    except (OSError, ValueError):
        data = None
    entries = data.get("datasets") if isinstance(data, dict) else None
    if isinstance(entries, list) and any(isinstance(e, dict) and is_embedded(e.get("path")) for e in entries):
        rewritten = []
        for entry in entries:
            entry = dict(entry)
            path = entry.get("path")
            if is_embedded(path):
                assert isinstance(path, str)
                name = path.removeprefix(SCHEME)
                if name not in CORPORA:
                    raise EmbeddedDataError(
                        f"{blend}: unknown embedded corpus {path!r}; known: "
                        + ", ".join(SCHEME + c for c in CORPORA)
                    )
                entry["path"] = str(get_assets().corpora[name])
            elif isinstance(path, str) and "://" not in path and not Path(path).expanduser().is_absolute():
                entry["path"] = str((recipe_dir / path).resolve())
            rewritten.append(entry)
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        out = work_dir / blend.name
        atomic_write_text(out, json.dumps({**data, "datasets": rewritten}, indent=2) + "\n")
        blend_path = str(out.resolve())
    return dataclasses.replace(cfg, tokenizer=tokenizer, blend_path=blend_path)
