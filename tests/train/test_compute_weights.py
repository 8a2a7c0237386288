"""`train.compute_weights`: bf16 compute weights with fp32 master weights through FSDP2 in a
single process (a one-rank mesh and process group), next to the fp32-weights path."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nemotron.train import pretrain
from nemotron.train.loop import build_model, resolve_compute_weights
from nemotron.train.metrics import read_metrics

from .conftest import make_config


def _losses(job) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in read_metrics(job) if r["kind"] == "train"}


def _config(tmp_path, blend, compute_weights, **checkpoint):
    # 4 micro-batches of 1 per step: accumulation on the one-rank mesh
    return make_config(
        tmp_path,
        blend=blend,
        train={
            "train_iters": 4,
            "eval_iters": 0,
            "precision": "bf16",
            "compute_weights": compute_weights,
            "global_batch_size": 4,
            "micro_batch_size": 1,
        },
        checkpoint={"save_interval": 2, **checkpoint},
    )


@pytest.mark.timeout(300)
def test_one_process_bf16_compute_weights_train_like_fp32_and_resume_exactly(tmp_path, corpus):
    fp32 = _config(tmp_path / "fp32", corpus[0], "fp32")
    pretrain(fp32, tmp_path / "fp32" / "job")
    bf16 = _config(tmp_path / "bf16", corpus[0], "bf16")
    summary = pretrain(bf16, tmp_path / "bf16" / "job")
    assert not dist.is_initialized()  # the one-rank group is gone again
    assert summary.steps == 4 and summary.checkpoint.endswith("iter_0000004")
    ours, ref = _losses(tmp_path / "bf16" / "job"), _losses(tmp_path / "fp32" / "job")
    assert sorted(ours) == [1, 2, 3, 4]
    assert ours != ref  # really bf16 weights: not the fp32 path
    assert all(abs(ours[s] - ref[s]) < 0.02 for s in ours)  # within bf16 tolerance

    resumed = _config(
        tmp_path / "bf16",
        corpus[0],
        "bf16",
        load=str(tmp_path / "bf16" / "ckpt" / "iter_0000002"),
        save=str(tmp_path / "bf16" / "ckpt2"),
    )
    assert pretrain(resumed, tmp_path / "bf16" / "resumed").resumed_from.endswith("iter_0000002")
    again = _losses(tmp_path / "bf16" / "resumed")
    assert sorted(again) == [3, 4] and all(again[s] == ours[s] for s in again)


def test_resolution_and_errors(tmp_path):
    cfg = make_config(tmp_path).train  # precision fp32
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16 = make_config(tmp_path, train={"precision": "bf16"}).train
    assert resolve_compute_weights(bf16, cuda, 1) == "fp32"  # one micro-batch per step
    assert resolve_compute_weights(bf16, cuda, 1, grad_accumulation=4) == "bf16"
    assert resolve_compute_weights(bf16, cpu, 1, grad_accumulation=4) == "fp32"
    assert resolve_compute_weights(cfg, cuda, 1, grad_accumulation=4) == "fp32"
    assert resolve_compute_weights(bf16, cuda, 8) == "bf16"
    assert resolve_compute_weights(bf16, cpu, 8) == "fp32"
    assert resolve_compute_weights(cfg, cuda, 8) == "fp32"
    with pytest.raises(ValueError, match=r"train\.compute_weights='fp16' is not one of"):
        pretrain(make_config(tmp_path, train={"compute_weights": "fp16"}), tmp_path / "job")
    with pytest.raises(ValueError, match=r"compute_weights=bf16 needs train\.precision=bf16"):
        pretrain(make_config(tmp_path, train={"compute_weights": "bf16"}), tmp_path / "job")
    assert not dist.is_initialized()
    # bf16 outside pretrain without a process group: says what to do
    one = make_config(tmp_path, train={"compute_weights": "bf16", "precision": "bf16"})
    with pytest.raises(RuntimeError, match="one_rank=True"):
        build_model(one, torch.device("cpu"))


def test_build_model_one_rank_mesh_shards_in_bf16_compute(tmp_path):
    from nemotron.distributed.utils import launcher_process_group

    cfg = make_config(tmp_path, train={"compute_weights": "bf16", "precision": "bf16"})
    with launcher_process_group("cpu", one_rank=True):
        model, parallel = build_model(cfg, torch.device("cpu"))
        assert parallel.mesh is not None and parallel.dp_size == 1
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
        seen = []
        hook = model.backbone.layers["0"].register_forward_pre_hook(
            lambda m, args: seen.append(next(m.parameters()).dtype)
        )
        batch = torch.randint(0, 64, (1, 9))
        model(batch[:, :-1], labels=batch[:, 1:])
        hook.remove()
        assert seen == [torch.bfloat16]


def test_one_rank_mesh_reduces_expert_gradients_without_a_division_temporary(tmp_path):
    """On one rank FSDP2 copies each unit's gradients into their shard; given a divide factor
    (as units whose mesh holds other ranks' summed parts need) it divides them by it into a
    temporary the size of the unit's gradients, which for the routed experts of a large MoE
    layer was the step's memory peak on one GPU (2.4 GiB over an H100's memory for the proxy).
    With nothing to divide by, no unit's reduction divides."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nemotron.distributed.utils import launcher_process_group

    class Divisions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_) and isinstance(
                out, torch.Tensor
            ):
                self.numels.append(out.numel())
            return out

    cfg = make_config(tmp_path, train={"compute_weights": "bf16", "precision": "bf16"})
    with launcher_process_group("cpu", one_rank=True):
        model, _ = build_model(cfg, torch.device("cpu"))
        experts = next(iter(model.moe_layers())).experts
        expert_numel = sum(p.numel() for p in experts.parameters(recurse=False))
        batch = torch.randint(0, 64, (1, 9))
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        with Divisions() as divisions:
            loss.backward()
        assert all(p.grad is not None for p in experts.parameters(recurse=False))
        unit_numels = {
            expert_numel,
            *(sum(p.numel() for p in b.parameters()) for b in model.backbone.layers.values()),
        }
        assert not unit_numels & set(divisions.numels), divisions.numels
