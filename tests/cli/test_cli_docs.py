"""The README and docs/*.md describe the command tree that `nemotron --help` shows, both ways.

Every command is named in the docs (`nemotron nano3 export hf`) and every option of it appears
there (`--max-shard-gb`); every `nemotron ...` invocation the docs show names an existing
command, and each option it passes is one of that command's. A new command or option without
docs fails here, and so does a documented one that was renamed or removed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import typer

from nemotron.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Typer's own: help on every command, shell completion (README names --install-completion).
BUILTIN = {"-h", "--help", "--show-completion"}


def _tree() -> dict[str, Any]:
    """'nemotron nano3 export hf' -> its click command, for every command and group."""
    root = typer.main.get_command(app)
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: str) -> None:
        out[path] = cmd
        if hasattr(cmd, "list_commands"):
            ctx = typer.Context(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), f"{path} {name}")

    walk(root, "nemotron")
    return out


def _options(cmd: Any) -> set[str]:
    names = set()
    for param in cmd.params:
        names.update(o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("-"))
    return names - BUILTIN


def _invocations(text: str) -> list[list[str]]:
    """Each `nemotron ...` command line of a text, as shell words up to a comment or `&&`;
    a line ending in a backslash goes on."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for m in re.finditer(r"(?<![\w/.-])nemotron (?:nano3|--)[^\n`|#]*", text):
        line = m.group(0).split("&&")[0]
        try:
            words = shlex.split(line)
        except ValueError:  # an unbalanced quote in prose: not a command line
            continue
        # in prose the command ends at the punctuation that closes its clause: `(... plan),`
        for i, word in enumerate(words):
            if word != "..." and word.endswith((")", ",", ";", ":", ".")):
                words = [*words[:i], word.rstrip("),;:.")]
                break
        found.append(words)
    return found


TREE = _tree()
DOCS = "\n".join(p.read_text() for p in FILES)


def test_the_tree_is_found():
    assert {
        "nemotron nano3 pretrain",
        "nemotron nano3 data prep pretrain",
        "nemotron nano3 export hf",
    } <= set(TREE)
    assert len(_invocations(DOCS)) > 20


def test_every_command_is_documented():
    leaves = [path for path, cmd in TREE.items() if not hasattr(cmd, "list_commands")]
    missing = [path for path in leaves if path not in DOCS]
    assert not missing, f"commands no README/docs page names: {missing}"


def test_every_option_is_documented():
    missing = {}
    for path, cmd in TREE.items():
        absent = sorted(
            o for o in _options(cmd) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", DOCS)
        )
        if absent:
            missing[path] = absent
    assert not missing, f"options no README/docs page names: {missing}"


def test_every_documented_invocation_names_real_commands_and_options():
    wrong = []
    for words in _invocations(DOCS):
        path, rest = "nemotron", words[1:]
        while rest and f"{path} {rest[0]}" in TREE:
            path, rest = f"{path} {rest[0]}", rest[1:]
        cmd = TREE[path]
        if hasattr(cmd, "list_commands") and path != "nemotron":
            # a group named alone (`nemotron nano3 export`) is fine; with words it must resolve
            if rest and not rest[0].startswith("-"):
                wrong.append(f"{' '.join(words)}: no command {rest[0]!r} in {path!r}")
            continue
        options = _options(cmd) | BUILTIN
        for word in rest:
            word = word.lstrip("[").rstrip("]")  # a synopsis's optional `[--overwrite]`
            flag = word.split("=", 1)[0]
            if word.startswith("-") and flag not in options and not re.fullmatch(r"-+|\.\.\.", word):
                wrong.append(f"{' '.join(words)}: {path!r} has no option {flag!r}")
    assert not wrong, "\n".join(wrong)
