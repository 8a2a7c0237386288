"""The model's extension points (models/nano3/parallel.py): components and parallel objects are
given to the modules, and sharding replaces no method of any module instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from nemotron.models.nano3.moe import LocalDispatcher, MoE, sequence_balance_loss

from .tiny import tiny_config

# A TP2 x CP2 x EP2 layout built on a fake 8-rank process group (nothing runs, every plan is
# applied): afterwards no module instance carries its own `forward` (or any other function
# attribute bound to it), and the extension points hold the distributed objects.
NOTHING_PATCHED = r"""
import json, types, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.mamba2 import Mamba2Mixer
from nemotron.models.nano3.moe import MoE
from models.tiny import tiny_config
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
cfg = tiny_config()
parallel = ParallelismConfig(tensor_model_parallel_size=2, context_parallel_size=2,
                             expert_model_parallel_size=2, sequence_parallel=True)
mesh = build_mesh(ParallelDims.from_config(parallel, 8, cfg), "cpu")
with torch.device("meta"):
    model = Nano3ForCausalLM(cfg)
parallelize(model, mesh, parallel)
patched = [f"{name}.{attr}" for name, m in model.named_modules() for attr, v in vars(m).items()
           if attr == "forward" or isinstance(v, types.MethodType)]
kinds = {type(m).__name__: m for m in model.modules()}
attn, mamba, moe = (next(m for m in model.modules() if isinstance(m, t))
                    for t in (Attention, Mamba2Mixer, MoE))
print(json.dumps({
    "patched": patched,
    "attention": [type(attn.context_parallel).__name__, attn.fuse_qkv],
    "mamba": [type(mamba.context_parallel).__name__, type(mamba.tensor_parallel).__name__],
    "moe": [type(moe.dispatcher).__name__, type(moe.sequence_gather).__name__],
    "model": [type(model.vocab_parallel).__name__, model.parallel_init is not None],
}))
"""


def test_parallelize_replaces_no_method_and_fills_the_extension_points():
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        PYTHONPATH=tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", NOTHING_PATCHED], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patched"] == []
    assert result["attention"] == ["ContextParallel", False]
    assert result["mamba"] == ["ContextParallel", "HeadParallel"]
    assert result["moe"] == ["AllToAllDispatcher", "SequenceGather"]
    assert result["model"] == ["VocabParallelLoss", True]


class _CountingDispatcher(LocalDispatcher):
    calls = 0

    def dispatch(self, x, topk_idx, topk_weight):
        type(self).calls += 1
        return super().dispatch(x, topk_idx, topk_weight)


def test_moe_takes_its_components_from_the_constructor():
    cfg = tiny_config()
    torch.manual_seed(0)
    default = MoE(cfg)
    given = MoE(
        cfg, dispatcher=_CountingDispatcher(cfg.num_experts), router=default.router, experts=default.experts
    )
    given.shared_experts.load_state_dict(default.shared_experts.state_dict())
    assert given.router is default.router and given.experts is default.experts
    x = torch.randn(2, 6, cfg.hidden_size)
    y, aux = given(x)
    y_ref, aux_ref = default(x)
    assert _CountingDispatcher.calls == 1
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(aux, aux_ref, rtol=0, atol=0)


class _MirrorGather:
    """Stands in for the ranks holding the rest of the sequence: they routed the same tokens."""

    def __init__(self):
        self.calls = []

    def gather_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        self.calls.append(x.dtype)
        return torch.cat([x, x], dim=dim)


def test_moe_balance_loss_sees_the_gathered_sequence():
    cfg = tiny_config(moe_seq_aux_loss_coeff=0.1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(2, 6, cfg.hidden_size)
    route = moe.router(x.reshape(-1, cfg.hidden_size))
    scores = route.scores.view(2, 6, -1)
    topk = route.topk_idx.view(2, 6, -1)
    expected = sequence_balance_loss(
        torch.cat([scores, scores], 1), torch.cat([topk, topk], 1), cfg.moe_top_k
    )
    moe.sequence_gather = _MirrorGather()
    _, aux = moe(x)
    assert moe.sequence_gather.calls == [torch.float32, torch.int64]  # scores, then the choices
    torch.testing.assert_close(aux, expected)
