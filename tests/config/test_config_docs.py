"""The docs and the typed schema name the same configuration keys, with the same defaults.

Both ways: every key of the schema is documented (a key added to a dataclass without a line in
the docs fails here), and every key the docs name in backticks (`train.seed`,
`train.fp8.layers=[...]`) exists (a renamed or removed key whose docs stayed fails here).
A pretraining key counts as documented when any docs/*.md names it in full; the data-prep
recipe's keys are flat (`force`, `sample`), words too common to find in prose, so they must
have a row in docs/configuration.md's data-prep table. The defaults of docs/configuration.md's
tables are read as a command-line override would read them and compared with the dataclasses'.
The same for env.toml: every profile key has a row in docs/execution.md, which lists the keys
that only a Slurm profile may set.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from nemotron.config import PretrainConfig, env_toml
from nemotron.config.loader import parse_override
from nemotron.config.schema import DataPrepJobConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONFIGURATION = ROOT / "docs" / "configuration.md"
SECTIONS = ("model", "train", "optimizer", "scheduler", "checkpoint", "logger", "data")
# `section.name...` optionally followed by `=value`; `[]` / `[0]` index a list of sections.
KEY_SHAPE = re.compile(r"^((?:%s)(?:\.[A-Za-z_]\w*|\[\d*\])+)(?:=.*)?$" % "|".join(SECTIONS))
# Dotted names that are files, not keys (`model.safetensors`, `checkpoint.py`).
FILE_SUFFIXES = (".py", ".json", ".safetensors", ".yaml", ".md")
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|", re.M)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f.name
    return f.default_factory()


def schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a config dataclass with its default; a list of sections is the list's
    key plus `key[].field` for each field of its item type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(schema_keys(tp, key + "."))
            continue
        out[key] = _default(f)
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            out.update(schema_keys(item, key + "[]."))
    return out


def _inline_spans(text: str) -> list[str]:
    # Fenced blocks hold shell sessions and error output (a deliberately misspelt key, e.g.);
    # inline code spans are what the prose names.
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _named_keys(text: str) -> set[str]:
    keys = set()
    for span in _inline_spans(text):
        for token in span.split():
            m = KEY_SHAPE.match(token)
            if m and not m.group(1).endswith(FILE_SUFFIXES):
                keys.add(re.sub(r"\[\d+\]", "[]", m.group(1)))
    return keys


def _doc_mentions() -> dict[str, set[str]]:
    mentions: dict[str, set[str]] = {}
    for path in [*DOCS, ROOT / "README.md"]:
        for key in _named_keys(path.read_text()):
            mentions.setdefault(key, set()).add(path.name)
    return mentions


def _table(heading: str) -> dict[str, str]:
    """`key` -> `default` of the tables under a `## ` heading of docs/configuration.md."""
    body = CONFIGURATION.read_text().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return dict(ROW.findall(body))


PRETRAIN = schema_keys(PretrainConfig)
DATA_PREP = schema_keys(DataPrepJobConfig)
PRETRAIN_TABLE = _table("Pretraining recipe")
DATA_PREP_TABLE = _table("Data-prep recipe")


def test_the_schemas_and_tables_are_found():
    # guards the parsing: a reformatted table must not make the checks below vacuous
    assert len(PRETRAIN) > 90 and len(DATA_PREP) > 20
    assert len(PRETRAIN_TABLE) > 90 and len(DATA_PREP_TABLE) > 20
    assert "data.mixed_length_blends[].seq_length" in PRETRAIN


def test_every_pretraining_key_is_documented():
    mentions = _doc_mentions()
    docs_only = {k: v for k, v in mentions.items() if v - {"README.md"}}
    missing = sorted(k for k in PRETRAIN if k not in docs_only)
    assert not missing, f"schema keys that no docs/*.md names in backticks: {missing}"


def test_every_data_prep_key_has_a_row():
    missing = sorted(k for k in DATA_PREP if k not in DATA_PREP_TABLE)
    assert not missing, f"data-prep keys without a row in docs/configuration.md: {missing}"


def test_every_key_the_docs_name_exists():
    # a section name alone (`train.fp8`, `data.mixed_length_blends`) is a key too
    known = set(PRETRAIN) | {k.rsplit(".", 1)[0] for k in PRETRAIN if "." in k}
    unknown = {k: sorted(v) for k, v in _doc_mentions().items() if k not in known}
    assert not unknown, f"keys the docs name that the schema does not have: {unknown}"


def test_every_data_prep_row_is_a_key():
    assert sorted(set(DATA_PREP_TABLE) - set(DATA_PREP)) == []


@pytest.mark.parametrize(
    ("table", "schema"),
    [(PRETRAIN_TABLE, PRETRAIN), (DATA_PREP_TABLE, DATA_PREP)],
    ids=["pretrain", "data_prep"],
)
def test_documented_defaults_are_the_schemas(table, schema):
    wrong = {}
    for key, text in table.items():
        if key not in schema:
            wrong[key] = (text, "not a key")
            continue
        # the value as `key=<text>` on the command line would set it
        value = parse_override(f"x={text}").value
        if (
            value != schema[key]
            or type(value) is not type(schema[key])
            and not (isinstance(schema[key], float) and isinstance(value, int))
        ):
            wrong[key] = (text, schema[key])
    assert not wrong, f"documented default vs the dataclass's: {wrong}"


def _execution_section(heading: str) -> str:
    return (ROOT / "docs" / "execution.md").read_text().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def test_every_env_toml_key_has_a_row_and_every_row_is_a_key():
    # first column of execution.md's table; a row may name several keys (`host`, `user`, ...)
    rows = re.findall(r"^\| (`[^|]+`) \|", _execution_section("Sections and keys"), re.M)
    documented = {k for row in rows for k in re.findall(r"`(\w+)`", row)}
    assert documented == set(env_toml.PROFILE_KEYS)


def test_the_slurm_only_keys_are_listed():
    text = _execution_section("Sections and keys").split("Slurm-only keys (", 1)[1].split(")", 1)[0]
    listed = set(re.findall(r"`(\w+)`", text))
    # "the SSH keys" stands for the tunnel's own keys
    assert listed | set(env_toml.SSH_KEYS) == set(env_toml.SLURM_ONLY_KEYS)


def test_the_defaults_check_can_fail():
    assert parse_override("x=1e-3").value == 1e-3
    assert parse_override("x=null").value is None
    assert parse_override("x=[mamba, attention]").value == ["mamba", "attention"]
    assert parse_override("x=4").value != PRETRAIN["data.mixed_length_blends[].weight"]
