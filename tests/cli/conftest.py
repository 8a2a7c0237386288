from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from nemotron.cli.main import app


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cli(runner, tmp_path, monkeypatch):
    """Run `nemotron ...` in an empty working directory with a private cache dir."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    invoke.work = work
    return invoke


@pytest.fixture
def fake_module(monkeypatch):
    """Install a stand-in module (e.g. nemotron.data.prep) exposing the given functions."""

    def install(name: str, **attrs):
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name) or __import__(parent_name, fromlist=["_"])
        monkeypatch.setattr(parent, child, module, raising=False)
        return module

    return install
