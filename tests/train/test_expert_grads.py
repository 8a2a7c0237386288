"""`train.experts_float32_grads` (train/expert_grads.py) on CPU: the BF16 routed experts'
weight gradients in float32.

- the experts' MLP against the BF16 experts (`GroupedExperts.mlp`): the same output and input
  gradient bit for bit; each weight gradient, per expert and per tensor, equal to a float64
  product of independently computed BF16 intermediates within float32 rounding (the BF16
  experts' own are ~2e-3 off: their rounding), and not BF16 values;
- the weight-gradient product's reference against float64, and its checks;
- FSDP2 on a one-rank gloo mesh with BF16 compute weights: the swapped experts, float32 expert
  gradients that are not BF16 values, the same loss as without the key; accumulating over
  micro-batches unsharded (the sum in the product) equal, bit for bit, to reducing every one;
- checkpoints hold plain tensors: a run without the key (no FSDP) loads every saved tensor
  exactly, and a resumed run continues with the uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from distributed._spawn import run_distributed
from torch import nn

from nemotron.kernels.expert_wgrad import expert_weight_grad_reference
from nemotron.models.nano3.moe import GroupedExperts
from nemotron.train.expert_grads import (
    ExpertBf16MasterWeight,
    ExpertBf16Weight,
    Float32GradExperts,
    apply_float32_expert_grads,
    bf16_expert_mlp,
)

COUNTS = [37, 0, 120, 8, 61, 16, 0, 30]
HIDDEN, FFN = 48, 32


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    e = len(COUNTS)
    up = torch.randn(e, FFN, HIDDEN, generator=g) * 0.1
    down = torch.randn(e, HIDDEN, FFN, generator=g) * 0.1
    x = torch.randn(sum(COUNTS), HIDDEN, generator=g).bfloat16()
    grad = torch.randn(sum(COUNTS), HIDDEN, generator=g).bfloat16()
    return up, down, x, grad


def _offs(counts) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32)


def _independent_weight_grads(up, down, x, grad):
    """Per expert, in float64 from BF16 intermediates made one expert at a time with F.linear
    (not the grouped GEMM): dW_down = g^T h, dW_up = dh_pre^T x."""
    ups, downs, start = [], [], 0
    for e, c in enumerate(COUNTS):
        rows, g = x[start : start + c], grad[start : start + c]
        h_pre = torch.nn.functional.linear(rows, up[e].bfloat16())
        r = torch.relu(h_pre.float())
        h = r.square().bfloat16()
        grad_h = torch.nn.functional.linear(g, down[e].bfloat16().t())
        dh_pre = (grad_h.float() * 2 * r).bfloat16()
        downs.append(g.double().t() @ h.double())
        ups.append(dh_pre.double().t() @ rows.double())
        start += c
    return torch.stack(ups), torch.stack(downs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def test_mlp_matches_bf16_experts_with_float32_weight_gradients_per_expert():
    up32, down32, x0, g0 = _weights()
    up, down = up32.bfloat16().requires_grad_(), down32.bfloat16().requires_grad_()
    x = x0.clone().requires_grad_()
    out_ref = GroupedExperts.mlp(x, torch.tensor(COUNTS), up, down)
    out_ref.backward(g0)

    up_w = nn.Parameter(ExpertBf16Weight(up32.bfloat16(), torch.float32))
    down_w = nn.Parameter(ExpertBf16Weight(down32.bfloat16(), torch.float32))
    x2 = x0.clone().requires_grad_()
    out = bf16_expert_mlp(x2, up_w, down_w, _offs(COUNTS))
    out.backward(g0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    assert torch.equal(x2.grad, x.grad)
    assert up_w.grad.dtype == down_w.grad.dtype == torch.float32

    exact_up, exact_down = _independent_weight_grads(up32, down32, x0, g0)
    for name, ours, bf16, exact in (
        ("up", up_w.grad, up.grad, exact_up),
        ("down", down_w.grad, down.grad, exact_down),
    ):
        for e, c in enumerate(COUNTS):
            if c == 0:
                assert not ours[e].any() and not bf16[e].any(), (name, e)
                continue
            assert _rel(ours[e], exact[e]) < 1e-6, (name, e, _rel(ours[e], exact[e]))
            # the BF16 experts' gradient is the same sum rounded to BF16: the error this removes
            assert 1e-4 < _rel(bf16[e], exact[e]) < 4e-3, (name, e, _rel(bf16[e], exact[e]))
            assert (ours[e] != ours[e].bfloat16().float()).float().mean() > 0.9, (name, e)


def test_mlp_with_bf16_weights_returns_bf16_gradients_and_takes_no_rows():
    up32, down32, _, _ = _weights()
    up = up32.bfloat16().requires_grad_()
    down = down32.bfloat16().requires_grad_()
    x = torch.zeros(0, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    out = bf16_expert_mlp(x, up, down, _offs([0] * len(COUNTS)))
    assert out.shape == (0, HIDDEN)
    out.sum().backward()
    assert up.grad.dtype == torch.bfloat16 and not up.grad.any() and not down.grad.any()
    assert x.grad.shape == (0, HIDDEN)
    up_w = nn.Parameter(ExpertBf16Weight(up32.bfloat16(), torch.float32))
    down_w = nn.Parameter(ExpertBf16Weight(down32.bfloat16(), torch.float32))
    bf16_expert_mlp(x, up_w, down_w, _offs([0] * len(COUNTS))).sum().backward()
    assert up_w.grad.dtype == torch.float32 and not up_w.grad.any() and not down_w.grad.any()


def test_weight_grad_reference_is_float64_close_and_checks_its_buffer():
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(sum(COUNTS), 24, generator=g).bfloat16()
    inp = torch.randn(sum(COUNTS), 40, generator=g).bfloat16()
    out = expert_weight_grad_reference(grad, inp, _offs(COUNTS))
    assert out.dtype == torch.float32 and out.shape == (len(COUNTS), 24, 40)
    start = 0
    for e, c in enumerate(COUNTS):
        exact = grad[start : start + c].double().t() @ inp[start : start + c].double()
        assert (not out[e].any()) if c == 0 else _rel(out[e], exact) < 1e-6, e
        start += c
    into = torch.ones_like(out)
    assert expert_weight_grad_reference(grad, inp, _offs(COUNTS), accumulate_into=into) is into
    torch.testing.assert_close(into, out + 1, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        expert_weight_grad_reference(grad, inp, _offs(COUNTS), accumulate_into=out.bfloat16())
    with pytest.raises(ValueError, match="share their rows"):
        expert_weight_grad_reference(grad[1:], inp, _offs(COUNTS))


def test_swap_shares_parameters_and_unwrapped_forward_is_the_bf16_experts():
    """Outside FSDP2 (nothing gathered) a swapped module computes what `GroupedExperts` does;
    the swap keeps the parameters (wrapped, same storage) and skips FP8 experts."""
    experts = GroupedExperts(len(COUNTS), HIDDEN, FFN, 0.1, 0.1)
    holder = nn.Module()
    holder.experts = experts
    storage = experts.up_proj.data_ptr()
    assert apply_float32_expert_grads(holder) == 1
    swapped = holder.experts
    assert isinstance(swapped, Float32GradExperts)
    assert isinstance(swapped.up_proj, ExpertBf16MasterWeight) and swapped.up_proj.data_.data_ptr() == storage
    assert apply_float32_expert_grads(holder) == 0  # already swapped
    _, _, x, _ = _weights()
    counts = torch.tensor(COUNTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = swapped(x, counts)
        want = GroupedExperts.mlp(x, counts, swapped.up_proj.data_, swapped.down_proj.data_)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Under FSDP2 (one rank, gloo)


def _fsdp_config(tmp_path, knob: bool):
    from .test_fsdp_accumulation import _config

    cfg = _config(tmp_path)
    cfg.train = dataclasses.replace(
        cfg.train, precision="bf16", compute_weights="bf16", experts_float32_grads=knob
    )
    return cfg


@pytest.mark.timeout(300)
def test_fsdp2_one_rank_float32_expert_gradients_summed_in_the_product(tmp_path, monkeypatch):
    from nemotron.distributed.utils import launcher_process_group
    from nemotron.train import expert_grads
    from nemotron.train.loop import build_model

    from .test_fsdp_accumulation import STEPS, run_steps

    summed_into: list[bool] = []
    real = expert_grads.expert_weight_grad

    def recording(*args, accumulate_into=None, **kwargs):
        summed_into.append(accumulate_into is not None)
        return real(*args, accumulate_into=accumulate_into, **kwargs)

    monkeypatch.setattr(expert_grads, "expert_weight_grad", recording)
    runs = {}
    with launcher_process_group("cpu", one_rank=True):
        model, _ = build_model(_fsdp_config(tmp_path, True), torch.device("cpu"))
        assert sum(isinstance(m, Float32GradExperts) for m in model.modules()) == 2
        model, _ = build_model(_fsdp_config(tmp_path, False), torch.device("cpu"))
        assert not any(isinstance(m, Float32GradExperts) for m in model.modules())
        for knob in (True, False):
            for accumulate in (True, False):
                summed_into.clear()
                runs[knob, accumulate] = run_steps(_fsdp_config(tmp_path, knob), 0, 1, accumulate)
                if knob:
                    products = 2 * 2 * sum(2 * n for n in STEPS)  # MoE layers x (up, down) x micro-batches
                    assert len(summed_into) == products
                    assert sum(summed_into) == (products - 2 * 2 * len(STEPS) if accumulate else 0)
    on, off = runs[True, True], runs[True, False]
    for (loss, lm, norm, grads), (r_loss, r_lm, r_norm, r_grads) in zip(
        on["steps"], off["steps"], strict=True
    ):
        assert lm == r_lm
        experts = [n for n in grads if ".experts." in n]
        assert len(experts) == 4
        for name in experts:
            assert grads[name].dtype == "float32" and (grads[name] == r_grads[name]).all(), name
    # the same forward as without the key (the first step's loss), different expert gradients:
    # the BF16 experts' sums are rounded to BF16 before FSDP2 adds them, these are not
    first_on, first_bf16 = runs[True, True]["steps"][0], runs[False, True]["steps"][0]
    assert first_on[1] == first_bf16[1]
    for name in (n for n in first_on[3] if ".experts." in n):
        ours, bf16 = torch.from_numpy(first_on[3][name]), torch.from_numpy(first_bf16[3][name])
        assert 1e-5 < _rel(ours, bf16) < 4e-3, name


@pytest.mark.timeout(300)
def test_checkpoints_hold_plain_tensors_and_resume_exactly(tmp_path, corpus):
    from nemotron.train import pretrain

    from .conftest import make_config
    from .test_fp8 import _fp32_trainer_loads_exactly, _saved_tensors, _train_losses

    def config(name, knob, compute_weights, **checkpoint):
        train = {
            "train_iters": 4,
            "eval_iters": 0,
            "precision": "bf16",
            "compute_weights": compute_weights,
            "experts_float32_grads": knob,
        }
        return make_config(
            tmp_path / name, blend=corpus[0], train=train, checkpoint={"save_interval": 2, **checkpoint}
        )

    pretrain(config("f32", True, "bf16"), tmp_path / "f32" / "job")
    ckpt = tmp_path / "f32" / "ckpt" / "iter_0000002"
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if b"ExpertBf16" in p.read_bytes()]
    saved = _saved_tensors(ckpt, tmp_path / "saved.pt")

    _fp32_trainer_loads_exactly(
        config("plain", False, "fp32", load=str(ckpt)), tmp_path / "plain" / "job", saved
    )

    resumed = config("f32", True, "bf16", load=str(ckpt), save=str(tmp_path / "resumed"))
    assert pretrain(resumed, tmp_path / "resumed_job").resumed_from.endswith("iter_0000002")
    whole, again = _train_losses(tmp_path / "f32" / "job"), _train_losses(tmp_path / "resumed_job")
    assert sorted(again) == [3, 4] and all(again[s] == whole[s] for s in again), (again, whole)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [{}, {"expert_model_parallel_size": 2}], ids=["dp2", "dp2xep2"])
def test_two_ranks_keep_float32_expert_gradients_of_one_process(tmp_path, layout):
    """Two ranks (DP2, and DP2 x EP2: each rank its experts, all-to-all dispatch) with the key:
    every expert gradient, per tensor, equals one process's within float32 rounding (1e-5; the
    BF16 experts' would differ by their BF16 rounding, ~1e-3), and accumulating unsharded equals
    reducing every micro-batch: bit for bit under EP2 (each rank sums its own experts' products),
    within float32 rounding under DP2 (the two ranks' sums are added in another order)."""
    from nemotron.distributed.utils import launcher_process_group

    from .test_fsdp_accumulation import _rank_run, run_steps

    cfg = _fsdp_config(tmp_path, True)
    cfg.model = dataclasses.replace(cfg.model, **layout)
    with launcher_process_group("cpu", one_rank=True):
        reference = run_steps(_fsdp_config(tmp_path, True), 0, 1, True, check_sharding=False)["steps"]
    for ranks in run_distributed(_rank_run, 2, cfg):
        on, off = ranks[True], ranks[False]
        for (_, lm, _, grads), (_, r_lm, _, r_grads), (_, o_lm, _, o_grads) in zip(
            on["steps"], reference, off["steps"], strict=True
        ):
            assert lm == pytest.approx(r_lm, rel=1e-4)
            experts = [n for n in grads if ".experts." in n]
            assert len(experts) == 4
            for name in experts:
                ours = torch.from_numpy(grads[name])
                assert ours.dtype == torch.float32, name
                if layout:
                    assert (grads[name] == o_grads[name]).all(), name
                else:
                    assert _rel(ours, torch.from_numpy(o_grads[name])) < 1e-6, name
                assert _rel(ours, torch.from_numpy(r_grads[name])) < 1e-5, name


def _pipeline_expert_grads(rank, world_size, knob: bool):
    """PP2 (1F1B, 4 micro-batches) with BF16 compute weights: the stages' swapped experts, one
    step's loss, this rank's expert gradients and, per float32 weight-gradient product, the
    share of its values that are BF16 values."""
    from distributed.pipeline_harness import RecordingSGD, global_batch, make_config, rank_micro_batches

    from nemotron.train import expert_grads
    from nemotron.train.loop import build_model, train_step

    bf16_shares = []
    real = expert_grads.expert_weight_grad

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        bf16_shares.append(float((out == out.bfloat16().float()).float().mean()))
        return out

    expert_grads.expert_weight_grad = recording  # this spawned process's own module
    cfg = make_config(dict(pipeline_model_parallel_size=2, pipeline_schedule="1F1B"), seq=8, global_batch=4)
    cfg.train = dataclasses.replace(
        cfg.train, precision="bf16", compute_weights="bf16", experts_float32_grads=knob
    )
    model, parallel = build_model(cfg, torch.device("cpu"))
    swapped = sum(
        isinstance(m, Float32GradExperts) for part in parallel.pipeline.parts for m in part.modules()
    )
    opt = RecordingSGD(model, 0.0)
    samples = global_batch(0, 4, 8, cfg.model.vocab_size)
    result = train_step(
        model, opt, rank_micro_batches(samples, parallel), device=torch.device("cpu"), precision="bf16",
        grad_clip=0.0, parallel=parallel,
    )  # fmt: skip
    grads = {n: g.numpy() for n, g in opt.grads.items() if ".experts." in n}
    return swapped, result.lm_loss, grads, bf16_shares


@pytest.mark.timeout(300)
def test_pipeline_stages_write_float32_expert_gradients():
    """PP2 with BF16 compute weights: every stage swaps its own MoE layers' experts; their
    weight-gradient products are float32 sums (at most about a third of their values BF16 ones
    at these few rows per expert, zeros from the squared ReLU among them) although a pipeline schedule runs the backward inside the step's BF16
    autocast (where a float32 matmul would be a BF16 one: every value a BF16 value); the
    gradients differ from the run without the key by BF16's rounding, the loss does not."""
    on = run_distributed(_pipeline_expert_grads, 2, True)
    off = run_distributed(_pipeline_expert_grads, 2, False)
    assert [r[0] for r in on] == [1, 1] and [r[0] for r in off] == [0, 0]  # one MoE layer per stage
    for rank in range(2):
        assert on[rank][1] == off[rank][1]
        shares = on[rank][3]
        assert len(shares) == 2 * 4 and max(shares) < 0.6, shares  # (up, down) x micro-batches
        assert off[rank][3] == []
        assert set(on[rank][2]) == set(off[rank][2]) and len(on[rank][2]) == 2
        for name, grad in on[rank][2].items():
            assert grad.dtype == "float32"
            rel = _rel(torch.from_numpy(grad), torch.from_numpy(off[rank][2][name]))
            assert 1e-4 < rel < 4e-3, (name, rel)
