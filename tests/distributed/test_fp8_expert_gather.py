"""`train.fp8.experts_fsdp_float8_all_gather` under FSDP2 and expert parallelism (gloo, FP8
emulated on CPU; no torchao needed): FSDP2 gathers the routed experts' FP8 forms (whole experts
per rank, packed) instead of their weights, and training is unchanged.

Under data parallelism the losses equal those of quantizing per call, bit for bit (neither
matches one process exactly: each rank rounds its partial BF16 weight gradient); under EP2 they
equal EP2 without it, which matches one process (`test_fp8_parallel.py`)."""

from __future__ import annotations

from ._spawn import run_distributed
from .test_fp8_parallel import _compare


def _run(rank, world_size):
    ep = _compare(rank, world_size, dict(expert_model_parallel_size=2), ["experts"], True)
    gathered_ep = _compare(
        rank,
        world_size,
        dict(expert_model_parallel_size=2),
        ["experts"],
        True,
        experts_fsdp_float8_all_gather=True,
    )
    per_call = _compare(rank, world_size, dict(), ["experts"], False)
    gathered = _compare(rank, world_size, dict(), ["experts"], False, experts_fsdp_float8_all_gather=True)
    return ep, gathered_ep, per_call, gathered


def test_gathered_fp8_expert_forms_train_as_quantizing_per_call_under_dp_and_ep():
    results = run_distributed(_run, 2)
    assert results[0] == results[1]  # every rank reports the same global loss
    ep, gathered_ep, per_call, gathered = results[0]
    assert gathered_ep == ep and gathered == per_call
