"""The compiled blend index (`blend_index.cpp`) against the Python rule it replaces
(`blended.largest_deficit_reference`), element by element, and when each is used."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from nemotron.data import blend_index, blended
from nemotron.data.blended import build_blending_indices


@pytest.fixture(scope="module")
def compiled():
    """Builds the library once (about a second; then cached by torch on disk)."""
    try:
        blend_index.load_library()
    except blend_index.BlendIndexCompileError as exc:
        pytest.skip(f"no compiled blend index here: {exc}")


def _same(weights, size):
    want = build_blending_indices(weights, size, compiled=False)
    got = build_blending_indices(weights, size, compiled=True)
    for name, w, g in zip(("dataset_index", "dataset_sample_index"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape == (size,), name
        mismatch = np.flatnonzero(g != w)
        assert not len(mismatch), f"{name} differs first at sample {mismatch[:1]} for weights {weights}"


def _cases():
    rng = np.random.default_rng(20261205)
    cases = [
        ([1.0], 7),
        ([3.0, 0.0], 5),  # one positive weight
        ([1.0, 1.0], 2),
        ([1.0, 1.0, 1.0], 1001),  # ties everywhere: the first wins
        ([0.5, 0.25, 0.25], 999),
        ([1.0, 2.0, 1.0, 2.0], 1),
        ([0.2, 0.0, 0.3, 0.0, 0.5], 12345),  # zero weights never drawn
        ([1e-12, 1.0, 1e-9], 4001),  # extreme ratios
        ([1.0] * 25, 2500),
        ([7.0] * 40 + [1.0], 3333),
        ([1.0, 2.0], 0),
    ]
    for _ in range(40):
        num = int(rng.choice([1, 2, 3, 5, 8, 25, 26, 37]))
        weights = rng.random(num)
        if rng.random() < 0.3:  # repeated weights: ties
            weights = rng.choice(weights[: max(1, num // 3)], size=num)
        if rng.random() < 0.3:
            weights[rng.random(num) < 0.3] = 0.0
        if not weights.any():
            weights[0] = 1.0
        if rng.random() < 0.3:  # small integers, as sample counts of unweighted prefixes
            weights = np.ceil(weights * 10)
        cases.append((weights.tolist(), int(rng.integers(0, 4000))))
    return cases


@pytest.mark.parametrize("weights,size", _cases())
def test_compiled_equals_python_rule(compiled, weights, size):
    _same(weights, size)


def test_compiled_equals_python_rule_at_recipe_like_shape(compiled):
    """25 datasets of the shipped-recipe kind (shares from 0.1% to 20%), 200,000 samples."""
    rng = np.random.default_rng(7)
    _same((rng.dirichlet(np.full(25, 0.5)) + 1e-3).tolist(), 200_000)


def test_compiled_int64_dataset_index(compiled):
    """From 2**15 datasets on, the dataset index is int64 (both paths)."""
    weights = [0.0] * (2**15 + 2)
    weights[3], weights[2**15 + 1], weights[40000 % len(weights)] = 1.0, 2.0, 0.5
    _same(weights, 501)
    assert build_blending_indices(weights, 5, compiled=True)[0].dtype == np.int64


def test_compiled_refuses_bad_outputs(compiled):
    weights, ids = np.array([0.5, 0.5]), np.array([0, 1])
    with pytest.raises(ValueError, match="int16 or int64"):
        blend_index.largest_deficit(weights, ids, np.empty(3, np.int32), np.empty(3, np.int64))
    with pytest.raises(ValueError, match="differ"):
        blend_index.largest_deficit(weights, ids, np.empty(3, np.int16), np.empty(4, np.int64))
    with pytest.raises(ValueError, match="int16"):
        blend_index.largest_deficit(
            weights, np.array([0, 2**15]), np.empty(3, np.int16), np.empty(3, np.int64)
        )


def test_large_blends_use_the_compiled_loop(compiled, monkeypatch):
    calls = []
    real = blend_index.largest_deficit
    monkeypatch.setattr(blend_index, "largest_deficit", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(blended, "COMPILED_MIN_SAMPLES", 100)
    small = build_blending_indices([1.0, 2.0], 99)
    assert not calls
    large = build_blending_indices([1.0, 2.0], 100)
    assert calls == [1]
    assert np.array_equal(small[0], large[0][:99]) and np.array_equal(small[1], large[1][:99])


def test_without_a_compiler_the_python_loop_is_used_with_a_warning(monkeypatch, caplog):
    def unavailable():
        raise blend_index.BlendIndexCompileError("cannot build the compiled blend index (no c++)")

    monkeypatch.setattr(blend_index, "load_library", unavailable)
    monkeypatch.setattr(blended, "COMPILED_MIN_SAMPLES", 10)
    blend_index.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nemotron.data"):
            got = build_blending_indices([1.0, 3.0], 50)
        want = build_blending_indices([1.0, 3.0], 50, compiled=False)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert "no c++" in caplog.text and "Python loop" in caplog.text
        with pytest.raises(blend_index.BlendIndexCompileError):
            build_blending_indices([1.0, 3.0], 50, compiled=True)
    finally:
        blend_index.available.cache_clear()


def test_the_ninja_package_is_found_off_path(monkeypatch):
    """Where no ninja is on PATH (an environment not activated), the build gets the `ninja`
    package's, and PATH is left as it was."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(blend_index.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    with blend_index._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep) == ["/nowhere", ninja.BIN_DIR]
        assert Path(ninja.BIN_DIR, "ninja").exists()
    assert os.environ["PATH"] == "/nowhere"
