"""Gradient accumulation under FSDP2 without per-micro-batch communication
(`train.fsdp_accumulate_unsharded`): over steps of 3 and 2 micro-batches with uneven loss
masks, the losses and gradients equal the per-micro-batch path and a single process; the
weights are gathered and the gradients reduce-scattered once per step; after a step the
parameters are sharded again and the configured reshard-after-forward is back; a resumed
2-rank run continues exactly."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.distributed as dist
from distributed._spawn import run_distributed
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from nemotron.train import pretrain
from nemotron.train.loop import build_model, evaluate, fsdp_micro_batches, train_step
from nemotron.train.metrics import read_metrics

from .conftest import VOCAB, make_config

SEQ = 16
STEPS = (3, 2)  # micro-batches per rank in each step
LR = 0.1


def micro_batches(step: int, rows: list[int]) -> list[dict[str, torch.Tensor]]:
    """One micro-batch per row of the step's global batch, with uneven loss masks."""
    g = torch.Generator().manual_seed(100 + step)
    count = 2 * max(STEPS)
    tokens = torch.randint(0, VOCAB, (count, SEQ + 1), generator=g)
    mask = (torch.rand(count, SEQ, generator=g) < torch.linspace(0.1, 1.0, count)[:, None]).float()
    return [
        {"tokens": tokens[r : r + 1, :-1], "labels": tokens[r : r + 1, 1:], "loss_mask": mask[r : r + 1]}
        for r in rows
    ]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _is_sharded(p: torch.Tensor) -> bool:
    """FSDP2 registers the sharded DTensor while resharded, the gathered tensor while not."""
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


class _Counter:
    """Counts calls of a torch.distributed collective (FSDP2 looks it up at call time)."""

    def __init__(self, *names: str) -> None:
        self.name = next(n for n in names if hasattr(dist, n))
        self.original, self.calls = getattr(dist, self.name), 0

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        setattr(dist, self.name, counted)

    def restore(self) -> None:
        setattr(dist, self.name, self.original)


def run_steps(cfg, rank: int, world: int, accumulate: bool, check_sharding: bool = True) -> dict:
    """STEPS on this rank's rows; each step's loss, gradients and collective counts."""
    model, parallel = build_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    grads: dict[str, torch.Tensor] = {}
    optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    )
    gathers = _Counter("all_gather_single", "all_gather_into_tensor")
    reduces = _Counter("reduce_scatter_single", "reduce_scatter_tensor")
    out = {"steps": [], "gathers": [], "reduces": []}
    try:
        for step, n in enumerate(STEPS):
            rows = list(range(rank * n, (rank + 1) * n)) if world > 1 else list(range(2 * n))
            before = (gathers.calls, reduces.calls)
            result = train_step(
                model,
                optimizer,
                micro_batches(step, rows),
                device=torch.device("cpu"),
                precision=cfg.train.precision,
                grad_clip=0.0,
                parallel=parallel,
                fsdp_accumulate_unsharded=accumulate,
            )
            out["gathers"].append(gathers.calls - before[0])
            out["reduces"].append(reduces.calls - before[1])
            out["steps"].append(
                (result.loss, result.lm_loss, result.grad_norm, {k: v.numpy() for k, v in grads.items()})
            )
            if check_sharding:
                assert all(_is_sharded(p) for p in model.parameters())  # resharded after the step
                assert all(p.grad is None for p in model.parameters())
                # reshard-after-forward is back: blocks reshard after an eval forward
                evaluate(
                    model,
                    micro_batches(step, rows[:1]),
                    device=torch.device("cpu"),
                    precision=cfg.train.precision,
                    parallel=parallel,
                )
                blocks = model.backbone.layers.parameters()
                assert all(_is_sharded(p) for p in blocks) == (world > 1)
    finally:
        gathers.restore()
        reduces.restore()
    out["units"] = sum(1 for m in model.modules() if isinstance(m, FSDPModule))
    return out


def _rank_run(rank, world, cfg):
    return {accumulate: run_steps(cfg, rank, world, accumulate) for accumulate in (True, False)}


def _config(tmp_path, **model):
    return make_config(
        tmp_path,
        model=model,
        train={"global_batch_size": 4, "micro_batch_size": 1, "seq_length": SEQ, "precision": "fp32"},
    )


def assert_steps_close(ours, ref, rtol=1e-5, grad_rtol=1e-4, grad_atol=1e-7):
    for (loss, lm, norm, grads), (r_loss, r_lm, r_norm, r_grads) in zip(ours, ref, strict=True):
        assert lm == pytest.approx(r_lm, rel=rtol) and loss == pytest.approx(r_loss, rel=rtol)
        assert norm == pytest.approx(r_norm, rel=grad_rtol)
        assert grads.keys() == r_grads.keys()
        for name, grad in r_grads.items():
            torch.testing.assert_close(
                torch.from_numpy(grads[name]),
                torch.from_numpy(grad),
                rtol=grad_rtol,
                atol=grad_atol,
                msg=name,
            )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [{}, {"expert_model_parallel_size": 2}], ids=["dp2", "dp2xep2"])
def test_two_ranks_accumulating_unsharded_match_per_micro_batch_sync_and_one_process(tmp_path, layout):
    cfg = _config(tmp_path, **layout)
    reference = run_steps(cfg, 0, 1, accumulate=True, check_sharding=False)["steps"]  # no FSDP
    for ranks in run_distributed(_rank_run, 2, cfg):
        on, off = ranks[True], ranks[False]
        assert_steps_close(on["steps"], off["steps"])
        assert_steps_close(on["steps"], reference)
        # one reduce-scatter per unit per step, not per micro-batch (a unit on a one-rank mesh,
        # the experts under EP2, has none), and fewer gathers
        per_step = on["reduces"][0]
        assert 0 < per_step <= on["units"] and on["reduces"] == [per_step] * len(STEPS)
        assert off["reduces"] == [n * per_step for n in STEPS]
        assert all(a < b for a, b in zip(on["gathers"], off["gathers"]))


def held_after_first_micro_batch(cfg, accumulate: bool) -> bool:
    """Whether the weights stay gathered (not sharded) after micro-batch 0's backward."""
    model, _ = build_model(cfg, torch.device("cpu"))
    batches = micro_batches(0, [0, 1])
    with fsdp_micro_batches(model, len(batches), accumulate) as prepare:
        held = []
        for index, batch in enumerate(batches):
            prepare(index)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
            out.loss.backward()
            held.append(not any(_is_sharded(p) for p in model.parameters()))
    assert all(_is_sharded(p) for p in model.parameters())
    assert all(
        _is_sharded(p.grad) and p.grad.dtype == torch.float32
        for p in model.parameters()
        if p.grad is not None
    )
    return held[0]


def _one_rank(cfg):
    from nemotron.distributed.utils import launcher_process_group

    with launcher_process_group("cpu", one_rank=True):
        assert held_after_first_micro_batch(cfg, True)
        assert not held_after_first_micro_batch(cfg, False)
        return {accumulate: run_steps(cfg, 0, 1, accumulate) for accumulate in (True, False)}


@pytest.mark.timeout(300)
def test_one_rank_bf16_compute_weights_accumulate_in_fp32(tmp_path):
    """train.compute_weights=bf16 in one process: FSDP2 on a one-rank mesh; accumulating
    unsharded (fp32 gradients from bf16 compute) matches reducing every micro-batch."""
    cfg = _config(tmp_path)
    cfg.train = dataclasses.replace(cfg.train, precision="bf16", compute_weights="bf16")
    runs = _one_rank(cfg)
    assert not dist.is_initialized()  # the one-rank group is gone again
    on, off = runs[True], runs[False]
    assert_steps_close(on["steps"], off["steps"], grad_rtol=1e-4, grad_atol=1e-6)
    reference = run_steps(_config(tmp_path), 0, 1, True, check_sharding=False)["steps"]
    for (_, lm, _, grads), (_, r_lm, _, _) in zip(on["steps"], reference):
        assert lm == pytest.approx(r_lm, abs=0.02)  # bf16 compute
        assert all(g.dtype == "float32" for g in grads.values())  # fp32 master gradients


def _fp8_experts_config(tmp_path, **layout):
    """bf16 compute weights, the routed experts in FP8 with gathered forms and FP8 weight
    gradients (emulated on CPU)."""
    from nemotron.train.fp8_config import Fp8Config

    cfg = _config(tmp_path, **layout)
    fp8 = Fp8Config(
        enabled=True, layers=["experts"], experts_fsdp_float8_all_gather=True, experts_weight_grad="fp8"
    )
    cfg.train = dataclasses.replace(cfg.train, precision="bf16", compute_weights="bf16", fp8=fp8)
    return cfg


def _assert_expert_grads_equal(on, off):
    for (_, _, _, grads), (_, _, _, r_grads) in zip(on["steps"], off["steps"], strict=True):
        experts = [name for name in grads if ".experts." in name]
        assert experts and all(grads[n].dtype == "float32" for n in experts)
        for name in experts:
            assert (grads[name] == r_grads[name]).all(), name


@pytest.mark.timeout(300)
def test_two_ranks_with_ep2_sum_gathered_fp8_expert_gradients_as_fsdp_does(tmp_path):
    """The summed FP8 expert gradients of `test_gathered_fp8_experts_sum_...` on two ranks under
    EP2 (each rank its experts): accumulating unsharded equals reducing every micro-batch."""
    cfg = _fp8_experts_config(tmp_path, expert_model_parallel_size=2)
    for ranks in run_distributed(_rank_run, 2, cfg):
        on, off = ranks[True], ranks[False]
        assert_steps_close(on["steps"], off["steps"], grad_rtol=1e-4, grad_atol=1e-6)
        _assert_expert_grads_equal(on, off)


@pytest.mark.timeout(300)
def test_gathered_fp8_experts_sum_their_weight_gradients_in_the_product(tmp_path, monkeypatch):
    """FP8 routed experts whose forms FSDP2 gathers (`train.fp8.experts_fsdp_float8_all_gather`)
    with FP8 weight gradients, one rank, bf16 compute weights: accumulating unsharded, each
    expert weight's gradient is summed in float32 by the weight-gradient product itself
    (`kernels.fp8.summed_weight_grads`: micro-batches after the first add into the sum) and
    handed to FSDP2 at the last micro-batch; reducing every micro-batch instead, FSDP2 adds each
    micro-batch's float32 gradient to its sharded sum. The same float32 products summed in the
    same order: every gradient equal, bit for bit for the experts'."""
    from nemotron.train import fp8_grouped

    summed_into = []
    real = fp8_grouped.grouped_weight_grad

    def recording(*args, accumulate_into=None, **kwargs):
        summed_into.append(accumulate_into is not None)
        return real(*args, accumulate_into=accumulate_into, **kwargs)

    monkeypatch.setattr(fp8_grouped, "grouped_weight_grad", recording)
    cfg = _fp8_experts_config(tmp_path)
    from nemotron.distributed.utils import launcher_process_group

    runs = {}
    with launcher_process_group("cpu", one_rank=True):
        for accumulate in (True, False):
            summed_into.clear()
            runs[accumulate] = run_steps(cfg, 0, 1, accumulate)
            moe_layers = sum(1 for k in cfg.model.hybrid_pattern if k == "E")
            # one rank takes both ranks' rows: 2 n micro-batches per step; (up, down) each
            products = moe_layers * 2 * sum(2 * n for n in STEPS)
            assert len(summed_into) == products
            # accumulating: every micro-batch after a step's first adds into the sum
            assert sum(summed_into) == (products - 2 * moe_layers * len(STEPS) if accumulate else 0)
    on, off = runs[True], runs[False]
    assert_steps_close(on["steps"], off["steps"], grad_rtol=1e-4, grad_atol=1e-6)
    _assert_expert_grads_equal(on, off)


def _resume_worker(rank, world, cfg_bytes, job):
    cfg = pickle.loads(cfg_bytes)
    pretrain(cfg, f"{job}/full")  # 4 steps, checkpoints at 2 and 4
    resumed = dataclasses.replace(
        cfg,
        checkpoint=dataclasses.replace(
            cfg.checkpoint, load=f"{cfg.checkpoint.save}/iter_0000002", save=f"{job}/ckpt2"
        ),
    )
    return pretrain(resumed, f"{job}/resumed").resumed_from


@pytest.mark.timeout(300)
def test_two_rank_run_with_accumulation_resumes_exactly(tmp_path, corpus):
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        train={"train_iters": 4, "eval_iters": 0, "global_batch_size": 8, "micro_batch_size": 2},
        checkpoint={"save_interval": 2},
    )  # 2 ranks x 2 micro-batches of 2
    resumed = run_distributed(_resume_worker, 2, pickle.dumps(cfg), str(tmp_path))
    assert resumed[0].endswith("iter_0000002")

    def losses(job):
        return {r["step"]: r["lm_loss"] for r in read_metrics(job) if r["kind"] == "train"}

    full, again = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(again) == [3, 4] and all(again[s] == full[s] for s in again)
