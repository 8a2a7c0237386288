"""The README's pretraining examples and override-syntax tokens are what users type first: each
one must load and validate as the CLI would (the recipe, then the overrides). The README once
showed `nemotron nano3 pretrain train.train_iters=5000` on the default recipe, which sets
`train.train_tokens`, so the example itself was refused ("set exactly one of them")."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nemotron.config import PretrainConfig, load_config, resolve_config_path
from nemotron.config.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[str]:
    # The bash block that follows "Examples:" in the CLI section.
    text = README.read_text()
    block = text.split("Examples:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    # Submissions need an env.toml and data prep has its own schema: the pretraining commands.
    return [
        line
        for line in lines
        if line.startswith("nemotron nano3 pretrain") and "--run" not in line and "--batch" not in line
    ]


def _override_tokens() -> list[str]:
    # First column of the "Config override syntax" table: `token` | value.
    text = README.read_text().split("## Config override syntax", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", text, re.M)]


def _load(argv: list[str]) -> PretrainConfig:
    name, overrides, rest = "default", [], iter(argv)
    for arg in rest:
        if arg in ("-c", "--config"):
            name = next(rest)
        elif arg in ("-d", "--dry-run"):
            continue
        else:
            assert "=" in arg and not arg.startswith("-"), f"unexpected argument {arg!r}"
            overrides.append(arg)
    return load_config(resolve_config_path(name, PretrainConfig), overrides, PretrainConfig)


def test_the_readme_shows_pretraining_examples():
    assert len(_examples()) >= 5 and len(_override_tokens()) >= 8


@pytest.mark.parametrize("command", _examples())
def test_every_readme_pretraining_example_validates(command):
    _load(shlex.split(command)[3:])


@pytest.mark.parametrize("token", _override_tokens())
def test_every_readme_override_token_validates_on_tiny(token):
    # Tokens are shown as typed in a shell (quotes included); one token may hold two settings.
    _load(["-c", "tiny", *shlex.split(token)])


def test_the_steps_example_replaces_the_token_length():
    (command,) = [c for c in _examples() if "train.train_iters=" in c]
    cfg = _load(shlex.split(command)[3:])
    assert cfg.train.train_iters == 5000 and cfg.train.train_tokens is None


def test_steps_on_the_token_recipe_alone_says_how_to_unset_the_tokens():
    with pytest.raises(ConfigError, match=r"both are set: unset one, e\.g\. train\.train_tokens=null"):
        _load(["train.train_iters=5000"])
    with pytest.raises(
        ConfigError, match=r"set exactly one of them \(got train_iters=None, train_tokens=None\)$"
    ):
        _load(["train.train_tokens=null"])
