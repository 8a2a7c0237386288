"""`pretrain` on one GPU with the default compute weights (skipped without CUDA; the H200 runs
it through `bash benchmarks/h200_suite.sh gpu-tests`)."""

from __future__ import annotations

import json

import pytest
import torch

from nemotron.train import pretrain
from nemotron.train.metrics import read_metrics

from .conftest import make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(tmp_path, blend, name, **checkpoint):
    cfg = make_config(
        tmp_path,
        blend=blend,
        train={
            "train_iters": 4,
            "eval_iters": 1,
            "eval_interval": 2,
            "precision": "bf16",
            "device": "cuda",
            "global_batch_size": 4,
            "micro_batch_size": 1,
        },
        checkpoint={"save_interval": 2, **checkpoint},
    )
    events = []
    summary = pretrain(cfg, tmp_path / name, on_event=lambda kind, payload: events.append((kind, payload)))
    losses = {r["step"]: r["lm_loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"}
    start = next(payload for kind, payload in events if kind == "start")
    return summary, losses, start


def test_auto_compute_weights_train_in_bf16_on_one_gpu_and_resume(tmp_path, corpus):
    summary, losses, start = _run(tmp_path, corpus[0], "job")
    # 4 micro-batches per step on CUDA: `auto` picks bf16 compute weights (one-rank FSDP2 mesh)
    assert start["grad_accumulation"] == 4 and start["compute_weights"] == "bf16"
    assert summary.steps == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[4] < losses[1]
    json.dumps(start)  # the event payload stays serialisable
    resumed_summary, resumed, _ = _run(
        tmp_path,
        corpus[0],
        "resumed",
        load=str(tmp_path / "ckpt" / "iter_0000002"),
        save=str(tmp_path / "ckpt2"),
    )
    assert resumed_summary.resumed_from.endswith("iter_0000002") and sorted(resumed) == [3, 4]
    # GPU kernels with atomics are not bitwise deterministic: equal within bf16 noise
    assert all(abs(resumed[s] - losses[s]) < 2e-3 for s in resumed)
