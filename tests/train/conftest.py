"""Tiny models, corpora and configs for the training tests (each built in well under a second)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nemotron.config.schema import ModelConfig, PretrainConfig
from nemotron.data.config import DataConfig
from nemotron.data.indexed import IndexedDatasetWriter
from nemotron.train.config import (
    CheckpointConfig,
    LoggerConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)

VOCAB = 64

# Tiny shapes gain nothing from intra-op threads, and the test machine's cores are shared.
torch.set_num_threads(1)

TINY_MODEL = dict(
    hybrid_pattern="ME*E",
    num_layers=4,
    hidden_size=32,
    vocab_size=VOCAB,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    mamba_num_heads=4,
    mamba_head_dim=8,
    mamba_state_size=8,
    mamba_num_groups=2,
    mamba_conv_kernel=4,
    mamba_chunk_size=4,
    num_experts=8,
    moe_top_k=2,
    moe_ffn_hidden_size=16,
    moe_shared_expert_hidden_size=16,
    ffn_hidden_size=32,
    init_std=0.05,
)


def markov_docs(rng: np.random.Generator, count: int, shift: int) -> list[np.ndarray]:
    """Documents from a sparse order-1 chain (each token has 2 likely successors), ending in 0
    (EOS): learnable, so loss can fall well below the unigram entropy."""
    docs = []
    for _ in range(count):
        length = int(rng.integers(10, 60))
        t = [int(rng.integers(1, VOCAB))]
        for _ in range(length - 1):
            step = shift if rng.random() < 0.8 else 2 * shift + 1
            t.append(1 + (t[-1] * 5 + step) % (VOCAB - 1))
        docs.append(np.asarray(t + [0], dtype=np.uint16))
    return docs


def write_prefix(prefix: Path, docs) -> str:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return str(prefix)


def write_corpus(root: Path, seed: int = 0, shift: int = 3, train_shards: int = 2) -> Path:
    """A per-split blend.json (two train shards, valid and test) with metadata.json beside it."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    blend = {"train": [], "valid": [], "test": []}
    for k in range(train_shards):
        blend["train"] += ["1.0", write_prefix(root / f"train_{k}", markov_docs(rng, 60, shift))]
    blend["valid"] = ["1.0", write_prefix(root / "valid", markov_docs(rng, 20, shift))]
    blend["test"] = ["1.0", write_prefix(root / "test", markov_docs(rng, 20, shift))]
    (root / "blend.json").write_text(json.dumps(blend))
    (root / "metadata.json").write_text(
        json.dumps({"kind": "DataBlendsArtifact-pretrain", "name": root.name, "seed": seed})
    )
    return root / "blend.json"


def make_config(
    tmp_path: Path, *, blend: Path | None = None, phase2_blend: Path | None = None, **sections
) -> PretrainConfig:
    """A tiny CPU run; `sections` maps a section name to a dict of field overrides."""
    cfg = PretrainConfig(
        model=ModelConfig(**TINY_MODEL),
        train=TrainConfig(
            train_iters=8,
            global_batch_size=4,
            micro_batch_size=2,
            seq_length=16,
            seed=1234,
            eval_interval=4,
            eval_iters=1,
            precision="fp32",
            device="cpu",
            expert_bias_update_rate=1e-2,
        ),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4),
        scheduler=SchedulerConfig(warmup_tokens=128, stable_fraction_end=0.5),
        checkpoint=CheckpointConfig(save=str(tmp_path / "ckpt"), save_interval=3),
        logger=LoggerConfig(progress_bar=False),
        data=DataConfig(
            blend=str(blend) if blend else None,
            phase2_blend=str(phase2_blend) if phase2_blend else None,
            phase2_start_fraction=0.5,
            cache_dir=str(tmp_path / "cache"),
        ),
    )
    for section, values in sections.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "phase1", seed=0, shift=3), write_corpus(root / "phase2", seed=1, shift=4)
