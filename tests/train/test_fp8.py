"""`train.fp8` (train/fp8.py): config checks, which modules are swapped, the FP8 roundings of
dense linears and routed experts against independent references (torchao's emulation mode
on CPU), the padded expert-row layout, and checkpoints interchangeable with BF16 runs.

Tests that need torchao skip with the reason when it is not installed."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nemotron.config.errors import ConfigError
from nemotron.config.schema import validate_pretrain
from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.models.nano3.moe import GroupedExperts
from nemotron.train import fp8 as fp8_mod
from nemotron.train.fp8 import Fp8Config, Fp8Unavailable, apply_fp8, check_fp8_config, torchao_available

from .conftest import TINY_MODEL, make_config

needs_torchao = pytest.mark.skipif(
    not torchao_available(), reason="torchao >= 0.18 is not installed (pip install 'nemotron[fp8]')"
)
CPU = torch.device("cpu")
E4M3_MAX = 448.0


def _tiny(**kw) -> Nano3ForCausalLM:
    torch.manual_seed(0)
    return Nano3ForCausalLM(Nano3Config(**{**TINY_MODEL, **kw}))


# ---------------------------------------------------------------------------------------------
# Config


def test_config_checks_name_the_key(tmp_path):
    ok = Fp8Config(enabled=True)
    assert check_fp8_config(ok, "bf16", 1) == []
    cases = {
        "train.fp8.recipe": Fp8Config(recipe="blockwise"),
        "train.fp8.layers": Fp8Config(layers=["mamba", "router"]),
        "train.fp8.fsdp_float8_all_gather": Fp8Config(recipe="rowwise", fsdp_float8_all_gather=True),
        "train.fp8.lm_head_group_rows": Fp8Config(lm_head_group_rows=0),
    }
    for key, cfg in cases.items():
        problems = check_fp8_config(cfg, "bf16", 1)
        assert [k for k, _ in problems] == [key], (key, problems)
    assert check_fp8_config(Fp8Config(layers=["mamba", "mamba"]), "bf16", 1)[0][0] == "train.fp8.layers"
    # on with no layers would convert nothing (off, an empty list is harmless)
    empty = check_fp8_config(Fp8Config(enabled=True, layers=[]), "bf16", 1)
    assert [k for k, _ in empty] == ["train.fp8.layers"] and "convert nothing" in empty[0][1], empty
    assert check_fp8_config(Fp8Config(layers=[]), "bf16", 1) == []
    # only when enabled: precision, and the recipe under tensor parallelism (tensorwise only)
    assert check_fp8_config(Fp8Config(), "fp32", 2) == []
    assert check_fp8_config(Fp8Config(recipe="rowwise"), "bf16", 2) == []
    assert check_fp8_config(ok, "bf16", 2) == []  # tensorwise composes with TP
    assert [k for k, _ in check_fp8_config(ok, "fp32", 2)] == ["train.fp8.enabled"]
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        problems = check_fp8_config(Fp8Config(enabled=True, recipe=recipe), "bf16", 2)
        assert [k for k, _ in problems] == ["train.fp8.recipe"], problems
        assert "tensor_model_parallel_size=2" in problems[0][1] and "tensorwise" in problems[0][1]
        assert check_fp8_config(Fp8Config(enabled=True, recipe=recipe), "bf16", 1) == []

    cfg = make_config(tmp_path, train={"fp8": Fp8Config(enabled=True, recipe="nope"), "precision": "bf16"})
    cfg.data = dataclasses.replace(cfg.data, mock=True)
    with pytest.raises(ConfigError, match=r"train\.fp8\.recipe: 'nope' is not one of"):
        validate_pretrain(cfg)


def test_recipe_keys_load_from_overrides(tmp_path):
    from nemotron.config.loader import load_config
    from nemotron.config.schema import PretrainConfig

    cfg = load_config(
        "tiny",
        [
            "train.fp8.enabled=true",
            "train.fp8.recipe=rowwise",
            "train.fp8.layers=[mamba,experts]",
            "train.precision=bf16",
        ],
        PretrainConfig,
    )
    assert cfg.train.fp8 == Fp8Config(enabled=True, recipe="rowwise", layers=["mamba", "experts"])
    assert not cfg.train.fp8.reuse_weights  # off by default: it holds the copies for the step
    assert load_config("tiny", ["train.fp8.reuse_weights=true"], PretrainConfig).train.fp8.reuse_weights
    from nemotron.kernels.cross_entropy import WGRAD_GROUP_ROWS

    assert cfg.train.fp8.lm_head_group_rows == WGRAD_GROUP_ROWS  # one default, the kernel's
    rows = load_config("tiny", ["train.fp8.lm_head_group_rows=24576"], PretrainConfig).train.fp8
    assert rows.lm_head_group_rows == 24576
    with pytest.raises(ConfigError, match=r"train\.fp8\.lm_head_group_rows"):
        load_config("tiny", ["train.fp8.lm_head_group_rows=many"], PretrainConfig)
    with pytest.raises(ConfigError, match=r"train\.fp8\.recipie"):
        load_config("tiny", ["train.fp8.recipie=rowwise"], PretrainConfig)


@needs_torchao
def test_fast_accum_reaches_all_three_torchao_products():
    """`train.fast_accum` (default on) sets torchao's accumulation for the output, input-gradient
    and weight-gradient products alike; off, none of them (torchao's recipes alone use it for
    the output only)."""
    assert Fp8Config().fast_accum
    for recipe in ("tensorwise", "rowwise"):
        for fast in (True, False):
            cfg = fp8_mod.float8_linear_config(Fp8Config(recipe=recipe, fast_accum=fast), emulate=True)
            gemms = (cfg.gemm_config_output, cfg.gemm_config_grad_input, cfg.gemm_config_grad_weight)
            assert [g.use_fast_accum for g in gemms] == [fast] * 3, (recipe, fast)


class _RecordedFp8Products:
    """Stands in for torch._scaled_mm / _scaled_grouped_mm on a machine without FP8 tensor
    cores: records each call's contraction length and `use_fast_accum`, and computes the
    product from the float8 operands with float32 products (rowwise or one scale per tensor)."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def mm(self, a, b, scale_a, scale_b, out_dtype=None, use_fast_accum=False, **_):
        self.calls.append((a.shape[-1], use_fast_accum))
        return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)

    def grouped_mm(self, a, b, scale_a, scale_b, offs=None, out_dtype=None, use_fast_accum=False, **_):
        self.calls.append((a.shape[-1], use_fast_accum))
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            out.append(
                (a[start:end].float() * scale_a[start:end, None]) @ (b[e].float() * scale_b[e][None, :])
            )
            start = end
        return torch.cat(out).to(out_dtype)


@pytest.mark.parametrize("fast", [True, False])
def test_fast_accum_is_asked_of_every_fp8_product_but_the_vocabulary_contraction(monkeypatch, fast):
    """With `fast_accum` the routed experts' four FP8 products and the LM head's logits and
    weight gradient ask the FP8 GEMM for fast accumulation; the LM head's hidden gradient,
    whose contraction is the vocabulary, never does. Without it none do. The values are those
    of the emulated path (the flag changes only how the hardware accumulates)."""
    from nemotron.kernels import cross_entropy as ce_mod
    from nemotron.kernels import fp8 as kfp8
    from nemotron.train.fp8_grouped import fp8_expert_mlp

    fake = _RecordedFp8Products()
    monkeypatch.setattr(torch, "_scaled_mm", fake.mm)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", fake.grouped_mm)
    monkeypatch.setattr(kfp8, "fp8_hardware", lambda device: True)
    torch.manual_seed(5)
    hidden, ffn, vocab = 32, 48, 96
    up = (torch.randn(3, ffn, hidden) * 0.1).bfloat16().requires_grad_()
    down = (torch.randn(3, hidden, ffn) * 0.1).bfloat16().requires_grad_()
    offs = torch.tensor([5, 5, 16], dtype=torch.int32)
    x = torch.randn(16, hidden).bfloat16().requires_grad_()
    out = fp8_expert_mlp(x, up, down, offs, emulate=False, fast_accum=fast)
    out.float().square().sum().backward()
    assert fake.calls == [(hidden, fast), (ffn, fast), (hidden, fast), (ffn, fast)]
    x2 = x.detach().clone().requires_grad_()
    ref = fp8_expert_mlp(x2, up.detach(), down.detach(), offs, emulate=True)
    assert torch.equal(out, ref)

    fake.calls.clear()
    h = torch.randn(40, hidden).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.2).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (40,))
    loss = ce_mod.linear_cross_entropy(
        h, w, labels, chunk_size=16, fp8=True, backend="torch", fp8_fast_accum=fast
    )
    loss.backward()
    # logits (contraction: hidden) and hidden gradients (vocabulary) per chunk of 16 rows, then
    # the weight gradient (the group's rows, padded to 16)
    assert fake.calls == [(hidden, fast), (vocab, False)] * 3 + [(48, fast)]


def test_missing_torchao_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(fp8_mod, "torchao_version", lambda: None)
    with pytest.raises(
        Fp8Unavailable, match=r"torchao >= 0\.18, which is not installed: pip install 'nemotron\[fp8\]'"
    ):
        apply_fp8(_tiny(), Fp8Config(enabled=True), CPU)
    monkeypatch.setattr(fp8_mod, "torchao_version", lambda: (0, 15))
    with pytest.raises(Fp8Unavailable, match=r"which is 0\.15"):
        apply_fp8(_tiny(), Fp8Config(enabled=True), CPU)
    # installed at a good version, but its import fails (e.g. built for another torch)
    monkeypatch.setattr(fp8_mod, "torchao_version", lambda: (0, 18))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(
        Fp8Unavailable, match=r"torchao 0\.18 is installed and cannot be imported \(ModuleNotFoundError"
    ):
        apply_fp8(_tiny(), Fp8Config(enabled=True), CPU)
    # the routed experts alone need only PyTorch
    assert apply_fp8(_tiny(), Fp8Config(enabled=True, layers=["experts"]), CPU).experts


# ---------------------------------------------------------------------------------------------
# Wiring


@needs_torchao
def test_apply_fp8_swaps_the_chosen_layers_only():
    from torchao.float8.float8_linear import Float8Linear

    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = apply_fp8(model, Fp8Config(enabled=True, layers=list(fp8_mod.FP8_LAYERS)), CPU)
    assert summary.emulated
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    # TINY_MODEL "ME*E": Mamba out_proj (in_proj's 100 outputs are not a multiple of 16: skipped),
    # attention q/k/v/o, both shared experts
    want = (
        {"backbone.layers.0.mixer.out_proj"}
        | {f"backbone.layers.2.mixer.{p}_proj" for p in "qkvo"}
        | {f"backbone.layers.{i}.mixer.shared_experts.{p}" for i in (1, 3) for p in ("up_proj", "down_proj")}
    )
    assert fp8_names == want and set(summary.linears) == want
    assert summary.skipped == {"backbone.layers.0.mixer.in_proj": fp8_mod.NOT_ALIGNED}
    assert f"not converted ({fp8_mod.NOT_ALIGNED}): backbone.layers.0.mixer.in_proj" in summary.describe()
    assert summary.experts == ["backbone.layers.1.mixer.experts", "backbone.layers.3.mixer.experts"]
    for i in (1, 3):
        assert isinstance(model.backbone.layers[str(i)].mixer.experts, fp8_mod.Float8GroupedExperts)
    assert type(model.lm_head) is nn.Linear and type(model.backbone.embeddings) is nn.Embedding
    assert not model.backbone.layers["2"].mixer.fused_qkv_enabled()  # q/k/v run as their modules
    # same parameter names and values: checkpoints and `export hf` see the BF16 model
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    only = _tiny()
    summary = apply_fp8(only, Fp8Config(enabled=True, layers=["attention"]), CPU)
    assert set(summary.linears) == {f"backbone.layers.2.mixer.{p}_proj" for p in "qkvo"}
    assert summary.experts == [] and summary.skipped == {}
    assert type(only.backbone.layers["1"].mixer.experts) is GroupedExperts

    default = _tiny()  # the default: dense linears only, routed experts stay bf16
    summary = apply_fp8(default, Fp8Config(enabled=True), CPU)
    assert set(summary.linears) == want and summary.experts == []
    assert type(default.backbone.layers["1"].mixer.experts) is GroupedExperts


def test_apply_fp8_leaves_experts_whose_widths_fp8_cannot_take():
    """Routed experts whose FFN width is not a multiple of 16 would compute in BF16 (their FP8
    grouped products cannot take it): they are left unconverted and listed as such, not counted
    as FP8 expert groups (no FP8 dispatch, no FP8 all-gather forms). torchao is not needed."""
    from nemotron.models.nano3.moe import LocalDispatcher
    from nemotron.train.fp8_gather import ExpertMasterWeight

    fp8 = Fp8Config(
        enabled=True, layers=["experts"], experts_weight_grad="fp8", experts_fsdp_float8_all_gather=True
    )
    model = _tiny(moe_ffn_hidden_size=24)
    summary = apply_fp8(model, fp8, CPU)
    names = [f"backbone.layers.{i}.mixer.experts" for i in (1, 3)]
    assert summary.experts == [] and summary.fp8_dispatch == []
    assert summary.skipped == dict.fromkeys(names, fp8_mod.NOT_ALIGNED)
    assert f"not converted ({fp8_mod.NOT_ALIGNED}): {', '.join(names)}" in summary.describe()
    for i in (1, 3):
        moe = model.backbone.layers[str(i)].mixer
        assert type(moe.experts) is GroupedExperts and type(moe.dispatcher) is LocalDispatcher
        assert not isinstance(moe.experts.up_proj, ExpertMasterWeight)
    aligned = apply_fp8(_tiny(), fp8, CPU)  # 16 wide: converted
    assert aligned.experts == names and aligned.skipped == {}


# ---------------------------------------------------------------------------------------------
# Numerics: independent references


FP8_MAX = {torch.float8_e4m3fn: E4M3_MAX, torch.float8_e5m2: 57344.0}


def _round_fp8(
    x: torch.Tensor, amax: torch.Tensor, power_of_2: bool, dtype: torch.dtype = torch.float8_e4m3fn
) -> torch.Tensor:
    """Reference float8 rounding written out: scale = max / amax (optionally rounded down to a
    power of two), saturate, round to `dtype`, unscale; float64 result."""
    fmax = FP8_MAX[dtype]
    scale = fmax / amax.double().clamp(min=1e-12)
    if power_of_2:
        scale = 2.0 ** torch.floor(torch.log2(scale))
    q = (x.double() * scale).clamp(-fmax, fmax).float().to(dtype)
    return q.double() / scale


def _rows(x: torch.Tensor, pow2: bool) -> torch.Tensor:
    return _round_fp8(x, x.abs().amax(dim=-1, keepdim=True), pow2)


def _cols(x: torch.Tensor, pow2: bool) -> torch.Tensor:
    return _round_fp8(x, x.abs().amax(dim=0, keepdim=True), pow2)


def _tensor(x: torch.Tensor, pow2: bool, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    return _round_fp8(x, x.abs().amax(), pow2, dtype)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_linear_matches_the_reference_roundings(recipe):
    """out = q(x) q(W)^T, dx = q(g) q(W), dW = q(g)^T q(x); tensorwise: one scale per tensor,
    the output gradient in e5m2 (range over precision); rowwise (all e4m3, scales rounded to
    powers of two): x and g per row and W per row for the output, W per column for dx, g and
    x per column for dW."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 48, bias=False)
    model = nn.Sequential(lin)
    x = torch.randn(40, 64) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different size
    x.requires_grad_(True)
    g = torch.randn(40, 48)
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(
        model, config=fp8_mod.float8_linear_config(Fp8Config(recipe=recipe), emulate=True)
    )
    out = model(x)
    out.backward(g)
    w = lin.weight.detach()
    xd = x.detach()
    if recipe == "tensorwise":
        ref = _tensor(xd, False) @ _tensor(w, False).T
        e5m2 = torch.float8_e5m2
        ref_dx = _tensor(g, False, e5m2) @ _tensor(w, False)
        ref_dw = _tensor(g, False, e5m2).T @ _tensor(xd, False)
    else:
        ref = _rows(xd, True) @ _rows(w, True).T
        ref_dx = _rows(g, True) @ _cols(w, True)
        ref_dw = _cols(g, True).T @ _cols(xd, True)
    exact = xd.double() @ w.double().T
    assert _rel(out, ref) < 1e-6, _rel(out, ref)
    assert _rel(x.grad, ref_dx) < 1e-6
    assert _rel(lin.weight.grad, ref_dw) < 1e-6
    assert 1e-3 < _rel(out, exact) < 0.08  # really rounded to float8, and still close


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


@pytest.mark.parametrize("autocast", [False, True])
def test_float8_grouped_experts_match_a_per_expert_reference(autocast):
    """Forward and input-gradient products from float8 operands (power-of-two scales: x and h
    per row, up and down per output row; dout and dh_pre per row, down and up one scale per
    expert matrix), each product rounded to BF16; weight gradients from the BF16 operands.
    Written out per expert in float64 (no torchao needed: the experts' path is PyTorch's)."""
    torch.manual_seed(2)
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    with torch.no_grad():  # columns 10^4 apart: the smallest land in e4m3's subnormals with one
        # scale per matrix (per-column scales would keep their 3 mantissa bits)
        experts.up_proj.mul_(torch.logspace(-4, 0, 32))
        experts.down_proj.mul_(torch.logspace(-4, 0, 48))
    f8 = fp8_mod.Float8GroupedExperts(experts, emulate=True)
    assert f8.up_proj is experts.up_proj  # shared, not copied
    counts = torch.tensor([7, 0, 19, 2])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    g = torch.randn(int(counts.sum()), 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = f8(x, counts)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    out.backward(g)

    up, down = _bf16(experts.up_proj.detach()), _bf16(experts.down_proj.detach())
    outs, dxs, dups, ddowns, lo = [], [], [], [], 0
    for e, c in enumerate(counts.tolist()):
        xe, ge = _bf16(x.detach()[lo : lo + c]), _bf16(g[lo : lo + c])
        pre = _bf16(_rows(xe, True) @ _rows(up[e], True).T)
        h = torch.relu(pre) ** 2
        outs.append(_bf16(_rows(h, True) @ _rows(down[e], True).T))
        dh = _bf16(_rows(ge, True) @ _tensor(down[e], True))  # down: one scale per expert
        dpre = _bf16(dh * 2 * torch.relu(pre))
        dxs.append(_bf16(_rows(dpre, True) @ _tensor(up[e], True)))  # up: one scale per expert
        dups.append(dpre.T @ xe)
        ddowns.append(ge.T @ _bf16(h))
        lo += c
    assert _rel(out, torch.cat(outs)) < 1e-3
    assert _rel(x.grad, torch.cat(dxs)) < 1e-3
    assert _rel(experts.up_proj.grad, torch.stack(dups)) < 1e-2  # BF16-rounded products
    assert _rel(experts.down_proj.grad, torch.stack(ddowns)) < 1e-2
    # the smallest columns alone (a whole-tensor error would not see their roundings): the
    # input gradient's through up, up's gradient rows through down
    assert _rel(x.grad[:, :4], torch.cat(dxs)[:, :4]) < 1e-3
    assert _rel(experts.up_proj.grad[:, :4], torch.stack(dups)[:, :4]) < 1e-2
    assert experts.up_proj.grad[1].abs().sum() == 0  # the expert with no rows
    assert experts.down_proj.grad[1].abs().sum() == 0
    exact = GroupedExperts.forward(experts, x.detach(), counts)
    assert 1e-3 < _rel(out, exact) < 0.1  # really rounded to float8, and still close


@pytest.mark.parametrize("weight_grad,gathered", [("bf16", False), ("fp8", False), ("fp8", True)])
def test_float8_grouped_experts_backward_ignores_an_open_autocast(weight_grad, gathered):
    """A pipeline schedule runs its stages' backward inside the step's BF16 autocast: the
    experts' gradients must be those of a backward run outside it, bit for bit (the emulated
    weight-gradient products are float32 products, not autocast's BF16 ones; with gathered forms
    of float32 master weights they are float32 gradients, where a BF16 product would show)."""
    from nemotron.train.fp8_gather import ExpertFp8Forms, pack_forms, unpack_forms

    torch.manual_seed(3)
    experts = GroupedExperts(
        num_experts=3, hidden_size=32, ffn_hidden_size=64, init_std=0.1, output_init_std=0.05
    )
    f8 = fp8_mod.Float8GroupedExperts(experts, emulate=True, weight_grad=weight_grad)
    if gathered:
        for name in ("up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            forms = ExpertFp8Forms(*unpack_forms(pack_forms(w), *w.shape[1:]), dtype=torch.float32)
            setattr(f8, name, nn.Parameter(forms))
    counts = torch.tensor([21, 5, 38])
    x = torch.randn(int(counts.sum()), 32).bfloat16().float()
    g = torch.randn(int(counts.sum()), 32)
    grads = []
    for backward_autocast in (False, True):
        f8.up_proj.grad = f8.down_proj.grad = None
        xi = x.clone().requires_grad_(True)
        out = f8(xi, counts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_autocast):
            out.backward(g)
        grads.append((xi.grad, f8.up_proj.grad, f8.down_proj.grad))
    assert grads[0][1].dtype == torch.float32
    for name, outside, inside in zip(("x", "up_proj", "down_proj"), *grads, strict=True):
        assert torch.equal(outside, inside), name


def _expert_scale(v: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Values already rounded per row, rounded again at one power-of-two scale for the whole
    expert (that of the expert's amax `amax`), float64: the FP8 weight gradients' operands."""
    return _round_fp8(v, amax, True)


def test_float8_grouped_experts_fp8_weight_grads_match_a_per_expert_reference():
    """`weight_grad="fp8"`: the weight gradients are products of FP8 operands with one scale per
    expert (power of two, that of the expert's amax), made from the per-row FP8 forms of dout,
    h, dh_pre and x; written out per expert in float64. Rows of x a thousand times apart: the
    small ones land in e4m3's subnormals at the expert's scale. Forward and input gradient are
    those of the BF16 weight-gradient path, bit for bit."""
    torch.manual_seed(3)
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    counts = torch.tensor([9, 0, 21, 3])
    rows = int(counts.sum())
    x0 = (
        (torch.randn(rows, 32) * torch.logspace(-3, 0, rows)[torch.randperm(rows)][:, None])
        .bfloat16()
        .float()
    )
    g = torch.randn(rows, 32).bfloat16().float()
    results = {}
    for wg in ("bf16", "fp8"):
        module = fp8_mod.Float8GroupedExperts(copy.deepcopy(experts), emulate=True, weight_grad=wg)
        assert f"{wg} weight gradients" in repr(module)
        x = x0.clone().requires_grad_(True)
        out = module(x, counts)
        out.backward(g)
        results[wg] = (out.detach(), x.grad, module.up_proj.grad, module.down_proj.grad)
    assert torch.equal(results["fp8"][0], results["bf16"][0])
    assert torch.equal(results["fp8"][1], results["bf16"][1])
    _, _, dup, ddown = results["fp8"]

    for e, ref in enumerate(_expert_weight_grad_references(experts, x0, g, counts)):
        if ref is None:
            assert dup[e].abs().sum() == 0 and ddown[e].abs().sum() == 0
            continue
        ref_up, ref_down = ref["fp8"]
        assert _rel(dup[e], ref_up) < 1e-2, (e, _rel(dup[e], ref_up))  # BF16-rounded products
        assert _rel(ddown[e], ref_down) < 1e-2, (e, _rel(ddown[e], ref_down))
        # really FP8 operands: away from the BF16 products, and still close
        exact_up, exact_down = ref["bf16"]
        assert 1e-3 < _rel(dup[e], exact_up) < 0.15, (e, _rel(dup[e], exact_up))
        assert 1e-3 < _rel(ddown[e], exact_down) < 0.15
    # the smallest rows of x alone (the products above sum them away): x's operand of up's
    # weight gradient, per element, is the reference's rounding at the expert's scale, where
    # they land in e4m3's subnormals
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_wgrad import expert_rows, transposed_groups_reference

    small = x0.abs().amax(-1) < 0.01
    assert small.sum() >= 3
    layout = expert_rows(torch.cumsum(counts, 0).int(), rows)
    xt, x_inv = transposed_groups_reference(*quantize_rows(x0.bfloat16()), layout)
    starts = (
        layout.offs_padded - torch.diff(layout.offs_padded, prepend=layout.offs_padded.new_zeros(1))
    ).tolist()
    lo = rounded_small = 0
    for e, c in enumerate(counts.tolist()):
        xe = _bf16(x0[lo : lo + c])
        got = xt[:, starts[e] : starts[e] + c].double().T * float(x_inv[e])
        want = _expert_scale(_rows(xe, True), xe.abs().amax()) if c else got
        assert torch.equal(got, want), e
        tiny = small[lo : lo + c]
        if tiny.any():  # really rounded below e4m3's normal range, not just scaled
            assert not torch.equal(got[tiny], _rows(xe, True)[tiny]), e
            rounded_small += 1
        lo += c
    assert rounded_small >= 1


def _expert_weight_grad_references(experts, x0, g, counts) -> list[dict | None]:
    """Per expert (None without rows), float64 from the operands written out: its up and down
    weight gradients as products of the FP8 operands of `weight_grad="fp8"` ("fp8": each
    operand per row, then at the expert's scale) and of the BF16 operands of "bf16"."""
    up, down = _bf16(experts.up_proj.detach()), _bf16(experts.down_proj.detach())
    refs: list[dict | None] = []
    lo = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            refs.append(None)
            continue
        xe, ge = _bf16(x0[lo : lo + c]), _bf16(g[lo : lo + c])
        pre = _bf16(_rows(xe, True) @ _rows(up[e], True).T)
        h = torch.relu(pre) ** 2
        dh = _bf16(_rows(ge, True) @ _tensor(down[e], True))
        dpre = _bf16(dh * 2 * torch.relu(pre))
        operands = {}
        for name, v in (("x", xe), ("g", ge), ("h", h), ("dpre", dpre)):
            operands[name] = _expert_scale(_rows(v, True), v.abs().amax())
        refs.append(
            {
                "fp8": (operands["dpre"].T @ operands["x"], operands["g"].T @ operands["h"]),
                "bf16": (dpre.T @ xe, ge.T @ _bf16(h)),
            }
        )
        lo += c
    return refs


@pytest.mark.parametrize("weight_grad", ["bf16", "fp8"])
def test_gathered_fp8_experts_round_weight_grads_to_bf16_unless_float32_is_asked(weight_grad):
    """FP8 experts on gathered forms of float32 master weights (FSDP2 holds no BF16 copy, so
    their gradients are float32 tensors): by default each weight gradient holds the product
    rounded to BF16, what the BF16 experts' gradients hold; with `float32_weight_grads`
    (`train.experts_float32_grads`) the float32 product. Per expert and per weight against a
    float64 product of the operands written out (`_expert_weight_grad_references`)."""
    from nemotron.train.fp8_gather import ExpertFp8Forms, pack_forms, unpack_forms

    torch.manual_seed(3)
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    counts = torch.tensor([9, 0, 21, 3])
    rows = int(counts.sum())
    x0 = (torch.randn(rows, 32) * torch.logspace(-2, 0, rows)[:, None]).bfloat16().float()
    g = torch.randn(rows, 32).bfloat16().float()
    grads = {}
    for float32 in (False, True):
        module = fp8_mod.Float8GroupedExperts(
            copy.deepcopy(experts), emulate=True, weight_grad=weight_grad, float32_weight_grads=float32
        )
        assert ("gradients in float32" in repr(module)) == float32
        for name in ("up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            forms = ExpertFp8Forms(*unpack_forms(pack_forms(w), *w.shape[1:]), dtype=torch.float32)
            setattr(module, name, nn.Parameter(forms))
        module(x0.clone().requires_grad_(True), counts).backward(g)
        grads[float32] = (module.up_proj.grad, module.down_proj.grad)
    refs = _expert_weight_grad_references(experts, x0, g, counts)
    for w, name in enumerate(("up_proj", "down_proj")):
        rounded, full = grads[False][w], grads[True][w]
        assert rounded.dtype == full.dtype == torch.float32
        assert torch.equal(rounded, full.bfloat16().float()), name  # the same product, rounded
        assert not torch.equal(rounded, full), name
        for e, ref in enumerate(refs):
            if ref is None:
                assert full[e].abs().sum() == 0 and rounded[e].abs().sum() == 0
                continue
            want = ref[weight_grad][w]
            # float32 sums of the same operands; BF16's half-unit rounding (2**-9) on top
            assert _rel(full[e], want) < 1e-6, (name, e, _rel(full[e], want))
            assert 1e-4 < _rel(rounded[e], want) < 2**-8, (name, e, _rel(rounded[e], want))


def test_experts_weight_grad_key_is_checked():
    problems = dict(check_fp8_config(Fp8Config(experts_weight_grad="fp4"), "bf16", 1))
    assert "'fp4' is not one of" in problems["train.fp8.experts_weight_grad"]
    fp8 = Fp8Config(enabled=True, layers=["mamba"], experts_weight_grad="fp8")
    assert "no 'experts'" in dict(check_fp8_config(fp8, "bf16", 1))["train.fp8.experts_weight_grad"]
    assert not check_fp8_config(
        Fp8Config(enabled=True, layers=["experts"], experts_weight_grad="fp8"), "bf16", 1
    )


@pytest.mark.parametrize(
    "tiles,says",
    [
        ([128, 128, 128, 4, 8, 1], "a list of 7 integers"),
        ("128,128,128,4,8,1,0", "a list of 7 integers"),
        ([128, 128, 128.0, 4, 8, 1, 0], "must be integers"),
        ([128, 128, 128, 4, 8, True, 0], "must be integers"),
        ([32, 128, 128, 4, 8, 1, 0], "BLOCK_M 32 is not 64, 128 or 256"),
        ([96, 128, 128, 4, 8, 1, 0], "BLOCK_M 96"),
        ([128, 8, 128, 4, 8, 1, 0], "BLOCK_N 8 is not a power of two from 16 to 256"),
        ([128, 96, 128, 4, 8, 1, 0], "BLOCK_N 96"),
        ([128, 512, 128, 1, 8, 1, 0], "BLOCK_N 512"),
        ([128, 128, 16, 4, 8, 1, 0], "BLOCK_K 16 is not a power of two from 32 to 256"),
        ([128, 128, 128, 0, 8, 1, 0], "stages 0 is not at least 1"),
        ([128, 128, 128, 4, 2, 1, 0], "warps 2 is not 4 or 8"),
        ([128, 128, 128, 4, 16, 1, 0], "warps 16"),
        ([128, 128, 128, 4, 8, 2, 0], "use_tma 2 is not 0 or 1"),
        ([128, 128, 128, 4, 8, 1, -1], "persistent -1 is not 0 or 1"),
        ([256, 128, 128, 5, 8, 1, 0], "245760 bytes of pipeline buffers exceed"),
    ],
)
def test_experts_grouped_tiles_are_checked_per_element(tiles, says):
    """Each bad `train.fp8.experts_grouped_tiles` value is one problem naming the key and what is
    wrong with which element (the bounds: Triton's FP8 tensor-core path on sm_90)."""
    fp8 = Fp8Config(layers=["experts"], experts_grouped_gemm="triton", experts_grouped_tiles=tiles)
    problems = check_fp8_config(fp8, "bf16", 1)
    assert [k for k, _ in problems] == ["train.fp8.experts_grouped_tiles"], problems
    assert says in problems[0][1], problems


def test_experts_grouped_gemm_keys_are_checked():
    ok = Fp8Config(enabled=True, layers=["experts"], experts_grouped_gemm="triton")
    assert check_fp8_config(ok, "bf16", 1) == []
    for tiles in ([128, 128, 128, 4, 8, 1, 0], [64, 16, 32, 1, 4, 0, 1], [128, 256, 128, 3, 8, 1, 1]):
        assert check_fp8_config(dataclasses.replace(ok, experts_grouped_tiles=tiles), "bf16", 1) == []
    problems = dict(check_fp8_config(Fp8Config(experts_grouped_gemm="cublas"), "bf16", 1))
    assert "'cublas' is not one of ['cutlass', 'triton']" in problems["train.fp8.experts_grouped_gemm"]
    # the experts' products, so it needs the experts (checked enabled or not, as experts_weight_grad)
    problems = dict(check_fp8_config(Fp8Config(layers=["mamba"], experts_grouped_gemm="triton"), "bf16", 1))
    assert list(problems) == ["train.fp8.experts_grouped_gemm"]
    assert "no 'experts'" in problems["train.fp8.experts_grouped_gemm"]
    # tiles without the Triton product would be ignored: refused instead
    cutlass = Fp8Config(layers=["experts"], experts_grouped_tiles=[128, 128, 128, 4, 8, 1, 0])
    problems = dict(check_fp8_config(cutlass, "bf16", 1))
    assert (
        list(problems) == ["train.fp8.experts_grouped_tiles"]
        and "'cutlass'" in problems["train.fp8.experts_grouped_tiles"]
    )


def test_experts_grouped_keys_load_from_overrides_and_reach_the_experts(monkeypatch):
    """The keys load from command-line overrides (a list as for `layers`); a bad element is one
    config error naming the key; `apply_fp8` hands them to the routed experts, which on CPU
    emulate the products unless the Triton interpreter is on (then the kernel runs there)."""
    from nemotron.config.loader import load_config
    from nemotron.config.schema import PretrainConfig

    overrides = [
        "train.fp8.enabled=true",
        "train.fp8.layers=[experts]",
        "train.precision=bf16",
        "train.fp8.experts_grouped_gemm=triton",
    ]
    cfg = load_config(
        "tiny", [*overrides, "train.fp8.experts_grouped_tiles=[128,256,128,3,8,1,0]"], PretrainConfig
    )
    assert cfg.train.fp8.experts_grouped_gemm == "triton"
    assert cfg.train.fp8.experts_grouped_tiles == [128, 256, 128, 3, 8, 1, 0]
    assert load_config("tiny", overrides, PretrainConfig).train.fp8.experts_grouped_tiles is None
    assert load_config("tiny", [], PretrainConfig).train.fp8.experts_grouped_gemm == "cutlass"
    with pytest.raises(ConfigError, match=r"train\.fp8\.experts_grouped_tiles: .*BLOCK_K 8 is not"):
        load_config(
            "tiny", [*overrides, "train.fp8.experts_grouped_tiles=[128,256,8,3,8,1,0]"], PretrainConfig
        )
    with pytest.raises(ConfigError, match=r"train\.fp8\.experts_grouped_tiles\[1\] must be an integer"):
        load_config(
            "tiny", [*overrides, "train.fp8.experts_grouped_tiles=[128,x,128,3,8,1,0]"], PretrainConfig
        )
    fp8 = cfg.train.fp8
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _tiny()
    apply_fp8(model, fp8, CPU)
    experts = model.backbone.layers["1"].mixer.experts
    assert experts.grouped_gemm == "triton" and experts.grouped_tiles == [128, 256, 128, 3, 8, 1, 0]
    assert experts.emulate and "triton products [128, 256, 128, 3, 8, 1, 0]" in repr(experts)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _tiny()
    apply_fp8(model, fp8, CPU)
    assert not model.backbone.layers["1"].mixer.experts.emulate  # the kernel runs, interpreted
    cutlass = _tiny()
    apply_fp8(
        cutlass, dataclasses.replace(fp8, experts_grouped_gemm="cutlass", experts_grouped_tiles=None), CPU
    )
    assert cutlass.backbone.layers["1"].mixer.experts.emulate  # no CPU CUTLASS: emulated


def test_apply_fp8_refuses_the_triton_product_a_gpu_cannot_run(monkeypatch):
    """On an FP8 GPU without TMA (sm_89) the Triton product's tiles must not use it (the default
    ones do): one error naming the key at `apply_fp8`, not a compile failure in the first step;
    without Triton installed, one naming `experts_grouped_gemm`. (No GPU needed: the capability
    is what the check reads; nothing touches the device.)"""
    import nemotron.kernels as kernels

    monkeypatch.setattr(fp8_mod, "fp8_hardware", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    cuda = torch.device("cuda")
    fp8 = Fp8Config(enabled=True, layers=["experts"], experts_grouped_gemm="triton")
    with pytest.raises(ValueError, match=r"experts_grouped_tiles: use_tma=1 \(the default tiles'\) .* sm_89"):
        apply_fp8(_tiny(), fp8, cuda)
    with pytest.raises(ValueError, match=r"experts_grouped_tiles: use_tma=1 needs"):
        apply_fp8(_tiny(), dataclasses.replace(fp8, experts_grouped_tiles=[128, 128, 128, 4, 8, 1, 0]), cuda)
    model = _tiny()
    apply_fp8(model, dataclasses.replace(fp8, experts_grouped_tiles=[128, 128, 128, 4, 8, 0, 0]), cuda)
    assert not model.backbone.layers["1"].mixer.experts.emulate  # the GPU's own FP8 path
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    apply_fp8(_tiny(), fp8, cuda)  # Hopper: the default tiles
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"experts_grouped_gemm: 'triton' .* Triton is not installed"):
        apply_fp8(_tiny(), fp8, cuda)


def test_apply_fp8_refuses_cutlass_experts_where_pytorch_has_no_scaled_grouped_mm(monkeypatch):
    """`torch._scaled_grouped_mm` exists for compute capability 9.0 and 10.0 only (PyTorch's own
    check): on an FP8 GPU outside that set (sm_89, sm_120) the default "cutlass" experts are one
    error naming the key at `apply_fp8`, not a failure in the first step; the dense layers and
    the Triton product (with pointer tiles) are still allowed there."""
    monkeypatch.setattr(fp8_mod, "fp8_hardware", lambda device: True)
    cuda = torch.device("cuda")
    fp8 = Fp8Config(enabled=True, layers=["experts"])
    for capability in ((8, 9), (12, 0), (9, 1)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        name = f"sm_{capability[0]}{capability[1]}"
        with pytest.raises(
            ValueError, match=rf"experts_grouped_gemm: 'cutlass' runs torch._scaled_grouped_mm.*{name}"
        ):
            apply_fp8(_tiny(), fp8, cuda)
    triton = dataclasses.replace(
        fp8, experts_grouped_gemm="triton", experts_grouped_tiles=[128, 128, 128, 4, 8, 0, 0]
    )
    model = _tiny()
    apply_fp8(model, triton, cuda)  # sm_120 (the last one set): the Triton product with pointer tiles
    assert not model.backbone.layers["1"].mixer.experts.emulate
    for capability in ((9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        model = _tiny()
        apply_fp8(model, fp8, cuda)
        assert not model.backbone.layers["1"].mixer.experts.emulate


def test_experts_on_a_gpu_without_fp8_tensor_cores_emulate_either_product(monkeypatch):
    """On a CUDA GPU without FP8 tensor cores (sm_80: A100) the run is reported emulated, and
    the routed experts must emulate their products too, whichever `experts_grouped_gemm`:
    neither `torch._scaled_grouped_mm` nor the Triton FP8 kernel runs there (they were handed
    the GPU's FP8 path since the Triton product was wired in). No GPU needed: the capability
    is what is read."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda = torch.device("cuda")
    for product in ("cutlass", "triton"):
        model = _tiny()
        fp8 = Fp8Config(enabled=True, layers=["experts"], experts_grouped_gemm=product)
        summary = apply_fp8(model, fp8, cuda)
        experts = model.backbone.layers["1"].mixer.experts
        assert summary.emulated and experts.emulate, product
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for product in ("cutlass", "triton"):
        model = _tiny()
        apply_fp8(model, Fp8Config(enabled=True, layers=["experts"], experts_grouped_gemm=product), cuda)
        assert not model.backbone.layers["1"].mixer.experts.emulate, product


def test_fp8_expert_mlp_refuses_an_unknown_product_or_bad_tiles():
    """Library callers get the config check's words (one validator) as a ValueError."""
    from nemotron.train.fp8_grouped import fp8_expert_mlp

    x, up, down = torch.randn(4, 32), torch.randn(2, 16, 32), torch.randn(2, 32, 16)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"grouped_gemm 'cublas' is not one of \['cutlass', 'triton'\]"):
        fp8_expert_mlp(x, up, down, offs, grouped_gemm="cublas")
    with pytest.raises(
        ValueError, match=r"grouped_tiles \[128, 128, 128, 4, 3, 1, 0\]: warps 3 is not 4 or 8"
    ):
        fp8_expert_mlp(x, up, down, offs, grouped_gemm="triton", grouped_tiles=[128, 128, 128, 4, 3, 1, 0])


def test_apply_fp8_refuses_what_the_config_check_refuses():
    """Library callers (the benchmarks) skip the recipe's load-time checks; `apply_fp8` runs the
    same check, so a misspelt layer kind is one error naming the key, not a model quietly
    converted without that layer. No torchao needed: nothing is converted."""
    model = _tiny()
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"train\.fp8\.layers: unknown layer kinds \['expert'\]"):
        apply_fp8(model, Fp8Config(enabled=True, layers=["mamba", "expert"]), CPU)
    assert {name: type(m) for name, m in model.named_modules()} == before
    with pytest.raises(ValueError, match=r"train\.fp8\.experts_weight_grad: .* has no 'experts'"):
        apply_fp8(_tiny(), Fp8Config(enabled=True, layers=["mlp"], experts_weight_grad="fp8"), CPU)
    with pytest.raises(ValueError, match=r"train\.fp8\.layers: is empty"):
        apply_fp8(_tiny(), Fp8Config(enabled=True, layers=[]), CPU)
    with pytest.raises(ValueError, match=r"train\.fp8\.experts_grouped_tiles: .*stages 0"):
        bad = Fp8Config(enabled=True, layers=["experts"], experts_grouped_gemm="triton")
        apply_fp8(_tiny(), dataclasses.replace(bad, experts_grouped_tiles=[128, 128, 128, 0, 8, 1, 0]), CPU)


def test_float8_grouped_experts_take_a_rank_with_no_rows():
    """Under expert parallelism a rank can receive no rows: output [0, hidden], weight
    gradients zero (the BF16 experts' path, as without FP8)."""
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    f8 = fp8_mod.Float8GroupedExperts(experts, emulate=True)
    x = torch.zeros(0, 32, requires_grad=True)
    out = f8(x, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 32)
    out.sum().backward()
    assert experts.up_proj.grad is None or experts.up_proj.grad.abs().sum() == 0


def test_quantize_rows_scales_are_powers_of_two_and_fill_the_range():
    from nemotron.kernels.fp8 import quantize_rows, quantize_transposed

    torch.manual_seed(3)
    x = torch.randn(6, 40) * torch.logspace(-6, 3, 6)[:, None]
    x[2] = 0.0  # an all-zero row quantizes to zeros
    q, inv = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and inv.shape == (6,) and inv.dtype == torch.float32
    mant, _ = torch.frexp(inv)
    assert torch.all(mant == 0.5)  # exact powers of two
    top = q.float().abs().amax(dim=-1)
    nonzero = torch.arange(6) != 2
    assert torch.all((top[nonzero] >= 224) & (top[nonzero] <= E4M3_MAX)) and top[2] == 0
    back = q.float() * inv[:, None]
    assert torch.all((back - x).abs() <= x.abs() * 2**-4 + inv[:, None] * 2**-9)  # e4m3: 3 mantissa bits
    # the transposed copy with one scale per matrix: the largest row inverse scale is the scale
    # of the matrix's amax, and the values are the per-tensor rounding of x
    w = torch.stack([x, x * 2.0**-20])
    _, inv_rows = quantize_rows(w)
    qt, inv_t = quantize_transposed(w, inv_rows.amax(-1))
    assert qt.shape == (2, 40, 6) and qt.is_contiguous() and inv_t.shape == (2, 40)
    for m in range(2):
        whole = float(w[m].abs().amax())
        assert torch.all(inv_t[m] == 2.0 ** -math.floor(math.log2(E4M3_MAX / whole)))
        assert torch.equal((qt[m].double() * inv_t[m, :, None]).T, _tensor(w[m], True))


def test_fp8_quantization_keeps_non_finite_values_non_finite():
    """amax of NaN / inf: a NaN element stays NaN and leaves its row's (tensor's) scale to the
    finite elements; an infinite one gives its row (tensor) scale 0, so every value of it is
    non-finite once dequantized, never finite garbage that would hide the overflow from the
    step's non-finite check; an all-zero row gets a finite scale. In the routed experts an
    infinite input row makes its own output row non-finite and leaves every other row as it was
    (the quantizations are per row)."""
    from nemotron.kernels.fp8 import quantize_rows, quantize_tensor

    nan, inf = float("nan"), float("inf")
    torch.manual_seed(5)
    clean = torch.randn(4, 32)
    x = clean.clone()
    x[0, 3], x[1, 5], x[2] = nan, -inf, 0.0
    q, inv = quantize_rows(x)
    back = q.float() * inv[:, None]
    q_clean, inv_clean = quantize_rows(torch.where(x.isnan(), 0.0, x))
    assert inv[0] == inv_clean[0] and back[0].isnan().tolist() == [i == 3 for i in range(32)]
    assert torch.equal(q[0].float()[x[0].isfinite()], q_clean[0].float()[x[0].isfinite()])
    assert not back[1].isfinite().any()
    assert 0 < float(inv[2]) < inf and torch.all(back[2] == 0)
    assert torch.equal(q[3].float(), quantize_rows(clean[3:])[0][0].float())
    for bad in (nan, inf):
        t, finite = clean.clone(), clean.clone()
        t[1, 2], finite[1, 2] = bad, 0.0
        tq, _, t_inv = quantize_tensor(t)
        t_back = tq.float() * t_inv
        if bad == inf:  # the whole tensor
            assert not t_back.isfinite().any()
        else:  # that element only, at the finite elements' scale
            assert t_back.isnan().sum() == 1 and t_inv == quantize_tensor(finite)[2]

    experts = GroupedExperts(
        num_experts=2, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    f8 = fp8_mod.Float8GroupedExperts(experts, emulate=True)
    counts = torch.tensor([3, 3])
    rows = torch.randn(6, 32)
    with torch.no_grad():
        want = f8(rows, counts)
        rows[4, 0] = inf
        got = f8(rows, counts)
    assert not got[4].isfinite().all() and torch.isfinite(want).all()
    others = torch.arange(6) != 4
    assert torch.equal(got[others], want[others])


@pytest.mark.parametrize("group_rows", [None, 64])
def test_fp8_lm_head_loss_and_gradients_match_the_reference_roundings(group_rows):
    """linear_cross_entropy(fp8=True), one power-of-two scale per tensor, written out in float64:
    logits = bf16(q(h_group) q(W)^T) (e4m3; h per group of rows, W per call); per chunk the
    logit gradient G (from those logits, each row times its token weight) gives
    dh = bf16(q(G_chunk) q(W)) (e4m3, the chunk's own amax); per group dW = sum over groups of
    e5m2(G_group)^T q(h_group), G's scale bounded by the group's largest token weight. Groups:
    one (70 rows), or of 64 rows (two weight-gradient products added)."""
    from nemotron.kernels import cross_entropy as ce_mod

    rows_arg = {} if group_rows is None else {"fp8_group_rows": group_rows}
    torch.manual_seed(4)
    n, hdim, vocab, chunk = 70, 32, 96, 32
    h = (torch.randn(n, hdim) * torch.logspace(-1, 1, n)[:, None]).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hdim) * 0.2).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[5] = -100
    loss_mask = torch.ones(n)
    loss_mask[7] = 0.25  # a real weight: the rows' gradient scales differ
    loss = ce_mod.linear_cross_entropy(
        h, w, labels, loss_mask, chunk_size=chunk, fp8=True, backend="torch", **rows_arg
    )
    loss.backward()

    hd, wd = _bf16(h.detach()), _bf16(w.detach())
    tok = (labels != -100).double() * loss_mask.double()
    s_row = tok / tok.sum()
    safe = labels.clamp_min(0)
    group = group_rows or n
    ref_dh = torch.zeros(n, hdim, dtype=torch.float64)
    ref_dw = torch.zeros(vocab, hdim, dtype=torch.float64)
    ref_dw_e4m3 = torch.zeros(vocab, hdim, dtype=torch.float64)  # what e4m3 would give (must differ)
    per_token = torch.zeros(n, dtype=torch.float64)
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        hq = _tensor(hd[g0:g1], True)
        logits = _bf16(hq @ _tensor(wd, True).T)
        lse = torch.logsumexp(logits, dim=-1)
        per_token[g0:g1] = lse - logits.gather(1, safe[g0:g1, None])[:, 0]
        G = torch.softmax(logits, dim=-1)
        G[torch.arange(g1 - g0), safe[g0:g1]] -= 1.0
        G = G * s_row[g0:g1, None]
        for c0 in range(0, g1 - g0, chunk):
            c1 = min(g1 - g0, c0 + chunk)
            ref_dh[g0 + c0 : g0 + c1] = _bf16(_tensor(G[c0:c1], True) @ _tensor(wd, True))
        bound = s_row[g0:g1].max()
        ref_dw += _round_fp8(G, bound, True, torch.float8_e5m2).T @ hq
        ref_dw_e4m3 += _round_fp8(G, bound, True).T @ hq
    ref_loss = (per_token * tok).sum() / tok.sum()
    assert abs(float(loss.detach()) - float(ref_loss)) < 1e-5 * float(ref_loss)
    assert _rel(h.grad, ref_dh) < 2e-3
    assert _rel(w.grad, ref_dw) < 2e-3
    assert _rel(ref_dw_e4m3, ref_dw) > 2e-2  # the format of the weight gradient's operand shows
    exact = ce_mod.linear_cross_entropy(h.detach().double(), w.detach().double(), labels, loss_mask)
    assert 1e-5 < abs(float(loss.detach()) - float(exact)) < 0.02 * float(exact)  # rounded, and close
    # recomputing in backward (grad_in_forward=False) gives the same gradients
    grads = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ce_mod.linear_cross_entropy(
        h,
        w,
        labels,
        loss_mask,
        chunk_size=chunk,
        fp8=True,
        backend="torch",
        grad_in_forward=False,
        **rows_arg,
    ).backward()
    assert torch.equal(h.grad, grads[0]) and torch.equal(w.grad, grads[1])
    with pytest.raises(ValueError, match="fp8 needs bf16"):
        ce_mod.linear_cross_entropy(h.float(), w.float(), labels, fp8=True)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_fp8_lm_head_under_torch_compile_is_the_eager_loss(grad_in_forward):
    """`train.compile` with the FP8 LM head: Dynamo could not trace the FP8 loss's autograd
    function (InternalTorchDynamoError: "intermediate tensor 'dweight' ... aliases an input or
    output"), so a compiled model with `lm_head` in `train.fp8.layers` failed at its first step.
    The FP8 loss now runs behind a graph break: loss and gradients are the eager ones, bit for
    bit. (backend="eager": Dynamo's tracing, which is what failed, without Inductor's cost.)"""
    from nemotron.kernels import cross_entropy as ce_mod

    torch.manual_seed(6)
    h0, w0 = torch.randn(24, 32), torch.randn(96, 32) * 0.2
    labels = torch.randint(0, 96, (24,))
    labels[3] = -100

    def loss_of(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ce_mod.linear_cross_entropy(
                h * 1.0, w, labels, fp8=True, backend="torch", chunk_size=16, grad_in_forward=grad_in_forward
            )

    results = []
    for fn in (loss_of, torch.compile(loss_of, backend="eager", fullgraph=False)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (eager, *eager_grads), (compiled, *compiled_grads) = results
    assert torch.equal(eager, compiled)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, compiled_grads))


def test_power_of_two_floor_is_exact_next_to_powers_of_two():
    """The scale rule: the largest power of two <= r, also one float32 step below a power of two
    (where exp2(floor(log2(r))) can round up) and at the ends of the normal range."""
    from nemotron.kernels.fp8 import power_of_two_floor

    eight = torch.tensor(8.0)
    edges = torch.stack(
        [eight, torch.nextafter(eight, torch.tensor(0.0)), torch.nextafter(eight, torch.tensor(9.0))]
    )
    wide = torch.exp(torch.empty(2000).uniform_(-80.0, 80.0, generator=torch.Generator().manual_seed(5)))
    r = torch.cat([edges, wide, torch.tensor([torch.finfo(torch.float32).tiny, 3.0e38, 448.0 / 3.0])])
    _, exponent = torch.frexp(r)  # r = m 2^e with m in [0.5, 1): the floor is 2^(e-1)
    want = torch.ldexp(torch.ones_like(r), exponent - 1)
    got = power_of_two_floor(r)
    assert torch.equal(got, want)
    assert got[:3].tolist() == [8.0, 4.0, 8.0]


def test_reused_weight_copies_are_made_once_per_scope():
    from nemotron.kernels import fp8 as kfp8

    made = []

    def quantize(w):
        made.append(1)
        return kfp8.quantize_rows(w)

    w = torch.randn(16, 32)
    a, b = object(), object()
    kfp8.quantized_weight(a, "rows", w, quantize)
    kfp8.quantized_weight(a, "rows", w, quantize)
    assert len(made) == 2  # outside a scope: on every call
    with kfp8.reuse_quantized_weights():
        first = kfp8.quantized_weight(a, "rows", w, quantize)
        assert kfp8.quantized_weight(a, "rows", w, quantize) is first and len(made) == 3
        kfp8.quantized_weight(b, "rows", w, quantize)  # another owner
        kfp8.quantized_weight(a, "columns", w, quantize)  # another form
        assert len(made) == 5
        with kfp8.reuse_quantized_weights():  # nested: the outer scope's copies
            assert kfp8.quantized_weight(a, "rows", w, quantize) is first
        assert kfp8.quantized_weight(a, "rows", w.double(), quantize) is not first  # not the same weight
        assert len(made) == 6
    assert kfp8._REUSE["cache"] is None  # dropped on exit
    with kfp8.reuse_quantized_weights():
        kfp8.quantized_weight(a, "rows", w, quantize)
    with kfp8.reuse_quantized_weights(enabled=False):
        kfp8.quantized_weight(a, "rows", w, quantize)
        kfp8.quantized_weight(a, "rows", w, quantize)
    assert len(made) == 9
    assert torch.equal(kfp8.rowwise(w)[0].view(torch.uint8), kfp8.quantize_rows(w)[0].view(torch.uint8))


def _count_weight_quantizations(monkeypatch, module) -> list[str]:
    """Wrap `module.quantized_weight` to record which forms are actually quantized."""
    made: list[str] = []
    real = module.quantized_weight

    def spy(owner, name, weight, quantize):
        def counted(w):
            made.append(name)
            return quantize(w)

        return real(owner, name, weight, counted)

    monkeypatch.setattr(module, "quantized_weight", spy)
    return made


def test_fp8_experts_and_lm_head_quantize_their_weights_once_per_step(monkeypatch):
    """Three micro-batches' forward and backward in one reuse scope: each FP8 weight form
    (experts' up/down per row and transposed, the LM head's one tensorwise pair) made once,
    and every gradient bit for bit what quantizing on every call gives."""
    from nemotron.kernels import cross_entropy as ce_mod
    from nemotron.kernels.fp8 import reuse_quantized_weights
    from nemotron.train import fp8_grouped

    expert_forms = _count_weight_quantizations(monkeypatch, fp8_grouped)
    head_forms = _count_weight_quantizations(monkeypatch, ce_mod)
    torch.manual_seed(6)
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    f8 = fp8_mod.Float8GroupedExperts(experts, emulate=True)
    head = nn.Parameter((torch.randn(64, 32) * 0.2).bfloat16())
    counts = [torch.tensor(c) for c in ([5, 0, 9, 2], [1, 7, 3, 3], [0, 0, 16, 0])]
    xs = [torch.randn(int(c.sum()), 32) for c in counts]
    labels = [torch.randint(0, 64, (int(c.sum()),)) for c in counts]

    def grads(reuse: bool):
        for p in (experts.up_proj, experts.down_proj, head):
            p.grad = None
        with reuse_quantized_weights(reuse):
            for c, x, y in zip(counts, xs, labels):
                out = f8(x, c)
                loss = ce_mod.linear_cross_entropy(out.bfloat16(), head, y, chunk_size=8, fp8=True)
                loss.backward()
        return [p.grad.clone() for p in (experts.up_proj, experts.down_proj, head)]

    every_call = grads(False)
    forms = ["down_proj.rows", "down_proj.transposed", "up_proj.rows", "up_proj.transposed"]
    assert sorted(set(expert_forms)) == forms
    assert len(expert_forms) == 12 and len(head_forms) == 3  # 3 micro-batches x each form
    expert_forms.clear()
    head_forms.clear()
    reused = grads(True)
    assert sorted(expert_forms) == forms
    assert head_forms == ["lm_head.tensorwise"]
    for got, want in zip(reused, every_call):
        assert torch.equal(got, want)


def test_train_step_reuses_fp8_weights_within_a_step_only(monkeypatch):
    """train_step with reuse (the default) == without, bit for bit, over two steps (each step's
    copies come from that step's weights: the scope closes before the optimizer step), with the
    experts' and LM head's weights quantized once per step for 3 micro-batches."""
    from nemotron.kernels import cross_entropy as ce_mod
    from nemotron.kernels.fp8 import _REUSE
    from nemotron.train import fp8_grouped
    from nemotron.train.loop import train_step

    forms = _count_weight_quantizations(monkeypatch, fp8_grouped)
    head_forms = _count_weight_quantizations(monkeypatch, ce_mod)
    vocab = TINY_MODEL["vocab_size"]
    gen = torch.Generator().manual_seed(11)
    batches = [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(2, 16)}
        for t in torch.randint(0, vocab, (3, 2, 17), generator=gen)
    ]

    def run(reuse: bool):
        model = _tiny(hybrid_pattern="E*E", num_layers=3, moe_ffn_hidden_size=32)
        apply_fp8(model, Fp8Config(enabled=True, layers=["experts", "lm_head"]), CPU)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = [
            train_step(
                model, opt, batches, device=CPU, precision="bf16", grad_clip=1.0, reuse_fp8_weights=reuse
            ).loss
            for _ in range(2)
        ]
        assert _REUSE["cache"] is None
        return losses, [p.detach().clone() for p in model.parameters()]

    every_call = run(False)
    assert len(forms) == 2 * 3 * 2 * 4 and len(head_forms) == 2 * 3  # steps x micro x layers x forms
    forms.clear()
    head_forms.clear()
    reused = run(True)
    assert len(forms) == 2 * 2 * 4 and len(head_forms) == 2  # once per step
    assert reused[0] == every_call[0] and every_call[0][0] != every_call[0][1]
    for got, want in zip(reused[1], every_call[1]):
        assert torch.equal(got, want)


@pytest.mark.timeout(300)
def test_pretrain_passes_reuse_weights_to_every_step(tmp_path, corpus, monkeypatch):
    """`train.fp8.reuse_weights` reaches the training step; with it the losses are the same as
    without (experts and LM head in FP8: no torchao needed)."""
    from nemotron.train import pretrain
    from nemotron.train import trainer as trainer_mod
    from nemotron.train.metrics import read_metrics

    seen = []
    real_step = trainer_mod.train_step

    def spy(*args, **kwargs):
        seen.append(kwargs["reuse_fp8_weights"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", spy)

    def losses(reuse: bool):
        fp8 = Fp8Config(enabled=True, layers=["experts", "lm_head"], reuse_weights=reuse)
        train = {"train_iters": 2, "eval_iters": 0, "precision": "bf16", "fp8": fp8}
        name = f"reuse{int(reuse)}"
        pretrain(make_config(tmp_path / name, blend=corpus[0], train=train), tmp_path / name / "job")
        return [r["lm_loss"] for r in read_metrics(tmp_path / name / "job") if r["kind"] == "train"]

    reused = losses(True)
    assert len(reused) == 2 and reused == losses(False)
    assert seen == [True, True, False, False]


@needs_torchao
def test_apply_fp8_under_tensor_parallelism_lists_what_its_layout_keeps_in_higher_precision():
    """The TP layout's exclusions (`tp_fp8_exclusions`) are reported with their reasons, not
    converted and then bypassed; the rest converts as without TP (numerics under TP2:
    tests/distributed/test_fp8_parallel.py)."""
    from torchao.float8.float8_linear import Float8Linear

    layers = list(fp8_mod.FP8_LAYERS)
    wide = dict(head_dim=16, moe_shared_expert_hidden_size=32)  # TP2 shards: multiples of 16
    plain = apply_fp8(_tiny(**wide), Fp8Config(enabled=True, layers=layers), CPU)
    model = _tiny(**wide)
    summary = apply_fp8(model, Fp8Config(enabled=True, layers=layers), CPU, tensor_parallel=2)
    in_proj = "backbone.layers.0.mixer.in_proj"
    assert summary.skipped == {
        in_proj: "rank-local under tensor parallelism",
        "lm_head": "the vocabulary-parallel loss of tensor parallelism has no FP8 products",
    }
    assert not model.fp8_lm_head and type(model.get_submodule(in_proj)) is nn.Linear
    assert summary.linears == plain.linears and summary.experts == plain.experts
    assert "rank-local under tensor parallelism): " + in_proj in summary.describe()
    # fewer KV heads than TP ranks: k/v are replicated (`KeepKVHead`) and stay higher precision
    model = _tiny(hidden_size=64, head_dim=16)  # q/o shards: multiples of 16 under TP4
    summary = apply_fp8(model, Fp8Config(enabled=True, layers=["attention"]), CPU, tensor_parallel=4)
    kv = [f"backbone.layers.2.mixer.{p}_proj" for p in "kv"]
    assert list(summary.skipped) == kv and all("fewer KV heads" in summary.skipped[n] for n in kv)
    assert summary.linears == [f"backbone.layers.2.mixer.{p}_proj" for p in "qo"]
    assert all(type(model.get_submodule(n)) is nn.Linear for n in kv)
    assert isinstance(model.get_submodule("backbone.layers.2.mixer.q_proj"), Float8Linear)
    # under TP the FP8 GEMMs take each rank's shard: k/v (2 heads x 8 = 16 outputs) split over
    # 2 ranks are too narrow
    summary = apply_fp8(_tiny(), Fp8Config(enabled=True, layers=["attention"]), CPU, tensor_parallel=2)
    assert summary.skipped == dict.fromkeys(kv, "dims not multiples of 16 x TP=2 (per-rank shards)")
    # only tensorwise scales compose with TP: one error naming the key
    with pytest.raises(ValueError, match=r"train\.fp8\.recipe=tensorwise"):
        apply_fp8(_tiny(), Fp8Config(enabled=True, recipe="rowwise"), CPU, tensor_parallel=2)


def test_apply_fp8_lm_head_is_opt_in_and_keeps_the_weights(monkeypatch):
    plain, head = _tiny(), _tiny()
    summary = apply_fp8(head, Fp8Config(enabled=True, layers=["lm_head"], lm_head_group_rows=48), CPU)
    assert summary.lm_head and head.fp8_lm_head and not plain.fp8_lm_head
    # the scale groups' rows reach the loss (`train.fp8.lm_head_group_rows`)
    from nemotron.kernels import cross_entropy as ce_mod
    from nemotron.models.nano3 import model as model_mod

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("fp8"), kwargs.get("fp8_group_rows"), kwargs.get("fp8_fast_accum")))
        return ce_mod.linear_cross_entropy(*args, **kwargs)

    monkeypatch.setattr(model_mod, "linear_cross_entropy", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head(torch.randint(0, head.config.vocab_size, (1, 8)), labels=torch.zeros(1, 8, dtype=torch.long))
    exact = _tiny()
    apply_fp8(exact, Fp8Config(enabled=True, layers=["lm_head"], fast_accum=False), CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact(torch.randint(0, head.config.vocab_size, (1, 8)), labels=torch.zeros(1, 8, dtype=torch.long))
    assert seen == [(True, 48, True), (True, ce_mod.WGRAD_GROUP_ROWS, False)]
    monkeypatch.undo()
    assert summary.linears == [] and summary.experts == [] and "LM head" in summary.describe()
    assert type(head.lm_head) is nn.Linear
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), head.state_dict().values()))
    ids = torch.randint(0, head.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(ids, labels=ids).lm_loss, head(ids, labels=ids).lm_loss
    assert a is not None and b is not None and 0 < abs(float(a.detach()) - float(b.detach())) < 0.05
    unfused = Nano3ForCausalLM(Nano3Config(**TINY_MODEL), fused_loss=False)
    assert list(apply_fp8(unfused, Fp8Config(enabled=True, layers=["lm_head"]), CPU).skipped) == ["lm_head"]
    assert not unfused.fp8_lm_head


# ---------------------------------------------------------------------------------------------
# Training and checkpoints


@needs_torchao
@pytest.mark.timeout(300)
def test_fp8_training_resumes_from_and_into_bf16_checkpoints(tmp_path, corpus):
    """A BF16 run's checkpoint resumes under FP8 and an FP8 run's under BF16: the saved
    tensors are the master weights either way. Losses stay within FP8's tolerance of BF16's."""
    from nemotron.train import pretrain
    from nemotron.train.metrics import read_metrics

    def losses(job):
        return {r["step"]: r["lm_loss"] for r in read_metrics(job) if r["kind"] == "train"}

    def config(name, fp8_on, **checkpoint):
        return make_config(
            tmp_path / name,
            blend=corpus[0],
            train={
                "train_iters": 4,
                "eval_iters": 0,
                "precision": "bf16",
                "fp8": Fp8Config(enabled=fp8_on, layers=list(fp8_mod.FP8_LAYERS)),
            },
            checkpoint={"save_interval": 2, **checkpoint},
        )

    starts = []

    def on_event(kind, payload):
        if kind == "start":
            starts.append(payload["fp8"])

    pretrain(config("bf16", False), tmp_path / "bf16" / "job", on_event=on_event)
    pretrain(config("fp8", True), tmp_path / "fp8" / "job", on_event=on_event)
    bf16, f8 = losses(tmp_path / "bf16" / "job"), losses(tmp_path / "fp8" / "job")
    # the start event (the CLI prints it) says what was converted
    assert starts[0] is None and starts[1].startswith("fp8: 9 linears, 2 expert groups, LM head, emulated"), (
        starts
    )
    assert sorted(f8) == [1, 2, 3, 4]
    assert f8 != bf16  # FP8 really ran
    assert all(abs(f8[s] - bf16[s]) < 0.05 * bf16[s] for s in f8), (f8, bf16)

    # FP8 -> BF16 and BF16 -> FP8 from step 2, each saving into its own directory
    into_bf16 = config(
        "fp8", False, load=str(tmp_path / "fp8" / "ckpt" / "iter_0000002"), save=str(tmp_path / "x1")
    )
    assert pretrain(into_bf16, tmp_path / "x1job").resumed_from.endswith("iter_0000002")
    into_fp8 = config(
        "bf16", True, load=str(tmp_path / "bf16" / "ckpt" / "iter_0000002"), save=str(tmp_path / "x2")
    )
    assert pretrain(into_fp8, tmp_path / "x2job").resumed_from.endswith("iter_0000002")
    # the resumed runs start from the same weights as the runs they came from: step 3's loss
    # is the same forward on the same batch, in the other precision
    a, b = losses(tmp_path / "x1job"), losses(tmp_path / "x2job")
    assert sorted(a) == sorted(b) == [3, 4]
    assert abs(a[3] - f8[3]) < 0.05 * f8[3] and abs(b[3] - bf16[3]) < 0.05 * bf16[3]


def _saved_tensors(checkpoint: Path, into: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, FQN-keyed ("model.<param>", "optimizer.state.<param>.
    exp_avg", ...), read back through DCP's own converter and a weights-only load: what a
    reader without this project's (or torchao's) classes gets."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, into)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}{key}.", sub)
        elif torch.is_tensor(value):
            flat[prefix[:-1]] = value

    walk("", torch.load(into, weights_only=True))
    return flat


def _fp32_trainer_loads_exactly(cfg, job: Path, saved: dict[str, torch.Tensor]) -> None:
    """A one-process run with FP32 weights (`cfg` loading the checkpoint `saved` was read from)
    holds every saved weight and optimizer tensor as a plain tensor, equal in dtype and value."""
    from nemotron.train.checkpoint import training_state_dict
    from nemotron.train.trainer import Trainer

    trainer = Trainer.for_run(cfg, job, compute_weights="fp32")
    try:
        loaded = training_state_dict(trainer.model, trainer.optimizer)
    finally:
        trainer.close()
    loaded_flat = {f"model.{k}": v for k, v in loaded["model"].items()}
    # keyed by parameter name ("state.<fqn>.exp_avg"), as checkpoints are written
    loaded_flat.update(
        {f"optimizer.{k}": v for k, v in loaded["optimizer"].items() if k.startswith("state.")}
    )
    assert set(loaded_flat) == {k for k in saved if k.startswith(("model.", "optimizer.state."))}
    for key, value in loaded_flat.items():
        assert type(value) in (torch.Tensor, nn.Parameter), (key, type(value))
        assert value.dtype == saved[key].dtype and torch.equal(value.detach(), saved[key]), key


def _train_losses(job: Path) -> dict[int, float]:
    from nemotron.train.metrics import read_metrics

    return {r["step"]: r["lm_loss"] for r in read_metrics(job) if r["kind"] == "train"}


@needs_torchao
@pytest.mark.timeout(300)
def test_fp8_all_gather_checkpoints_hold_plain_tensors_and_resume_in_bf16_exactly(tmp_path, corpus):
    """`train.fp8.fsdp_float8_all_gather`: torchao wraps the dense linears' weights (its
    `WeightWithDynamicFloat8CastTensor`, with or without FSDP2). A checkpoint must hold plain
    tensors: saved wrapped, every file pickled torchao's class, so a BF16 run and `export hf`
    (where torchao is not imported) could not read it. Here an FP8 run under FSDP2 (both
    all-gathers, FP8 expert weight gradients) saves; no file names torchao; a BF16 run on one
    process (no FSDP) loads every saved weight and optimizer tensor exactly; the FP8 run resumed
    from its step-2 checkpoint trains steps 3-4 with the uninterrupted run's losses."""
    from nemotron.train import pretrain

    fp8 = Fp8Config(
        enabled=True,
        layers=list(fp8_mod.FP8_LAYERS),
        fsdp_float8_all_gather=True,
        experts_fsdp_float8_all_gather=True,
        experts_weight_grad="fp8",
    )

    def config(name, fp8_config, compute_weights, **checkpoint):
        train = {
            "train_iters": 4,
            "eval_iters": 0,
            "precision": "bf16",
            "compute_weights": compute_weights,
            "fp8": fp8_config,
        }
        return make_config(
            tmp_path / name, blend=corpus[0], train=train, checkpoint={"save_interval": 2, **checkpoint}
        )

    pretrain(config("fp8", fp8, "bf16"), tmp_path / "fp8" / "job")
    ckpt = tmp_path / "fp8" / "ckpt" / "iter_0000002"
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if b"torchao" in p.read_bytes()]
    saved = _saved_tensors(ckpt, tmp_path / "saved.pt")
    assert any(k.startswith("optimizer.state.") for k in saved)

    _fp32_trainer_loads_exactly(
        config("bf16", Fp8Config(), "fp32", load=str(ckpt)), tmp_path / "bf16" / "job", saved
    )

    resumed = config("fp8", fp8, "bf16", load=str(ckpt), save=str(tmp_path / "resumed"))
    assert pretrain(resumed, tmp_path / "resumed_job").resumed_from.endswith("iter_0000002")
    whole, again = _train_losses(tmp_path / "fp8" / "job"), _train_losses(tmp_path / "resumed_job")
    assert sorted(again) == [3, 4] and all(again[s] == whole[s] for s in again), (again, whole)


def test_quantize_tensor_one_scale_both_layouts_and_padding():
    """`quantize_tensor`: one power-of-two scale for the whole tensor (the largest element lands in
    (max/2, max] of the format), the transposed copy the same values, zero in its padding
    columns; e5m2 keeps elements e4m3 flushes; NaN stays NaN without setting the scale."""
    from nemotron.kernels.fp8 import FLOAT8_WIDE, quantize_tensor, scale_for

    x = torch.randn(37, 48) * torch.logspace(-6, 2, 48)
    x[3, 5] = float("nan")
    for dtype in (torch.float8_e4m3fn, FLOAT8_WIDE):
        fmax = torch.finfo(dtype).max
        q, qt, inv = quantize_tensor(x, dtype, transposed_cols=48)
        amax = x.nan_to_num(0.0).abs().max()
        assert torch.equal(inv, 1.0 / scale_for(amax, dtype)) and fmax / 2 < float(amax / inv) <= fmax
        assert q.dtype == dtype and q.float()[3, 5].isnan()
        want = x / inv
        ok = ~want.isnan()
        assert torch.all((q.float()[ok] - want[ok]).abs() <= want[ok].abs() * 2**-3 + 2**-9)
        assert torch.equal(qt[:, :37].float().nan_to_num(7.0), q.t().float().nan_to_num(7.0))
        assert torch.all(qt[:, 37:].float() == 0) and qt.is_contiguous()
    tiny = x[0, 0:8].abs().clone()
    tiny[0] = 1.0
    tiny[1:] = 2.0**-20  # below e4m3's range at a scale for 1.0 (2^-12 < 2^-9), inside e5m2's
    assert float(quantize_tensor(tiny[None], torch.float8_e4m3fn)[0].float()[0, 1]) == 0.0
    assert float(quantize_tensor(tiny[None], FLOAT8_WIDE)[0].float()[0, 1]) > 0.0


@pytest.mark.timeout(300)
def test_experts_fsdp_float8_all_gather_trains_as_quantizing_per_call(tmp_path, corpus, monkeypatch):
    """`train.fp8.experts_fsdp_float8_all_gather`: FSDP2 (bf16 compute weights, one rank) gathers
    the routed experts' FP8 forms instead of BF16 weights. The losses are those of quantizing
    per call, bit for bit; the forms are made once per optimizer step (2 micro-batches); the
    checkpoint holds plain tensors and resumes into a run without FP8."""
    from nemotron.train import fp8_gather, fp8_grouped, pretrain
    from nemotron.train.metrics import read_metrics

    per_call_forms = _count_weight_quantizations(monkeypatch, fp8_grouped)
    packs = []
    real_pack = fp8_gather.pack_forms
    monkeypatch.setattr(
        fp8_gather, "pack_forms", lambda w, world=1: packs.append(w.shape) or real_pack(w, world)
    )

    def run(name, gather, fp8_on=True, **checkpoint):
        fp8 = Fp8Config(enabled=fp8_on, layers=["experts"], experts_fsdp_float8_all_gather=gather)
        train = {
            "train_iters": 3,
            "eval_iters": 0,
            "precision": "bf16",
            "compute_weights": "bf16",
            "fp8": fp8,
        }
        cfg = make_config(
            tmp_path / name, blend=corpus[0], train=train, checkpoint={"save_interval": 2, **checkpoint}
        )
        result = pretrain(cfg, tmp_path / name / "job")
        return result, [r["lm_loss"] for r in read_metrics(tmp_path / name / "job") if r["kind"] == "train"]

    _, per_call = run("per_call", False)
    moe_layers = TINY_MODEL["hybrid_pattern"].count("E")
    # steps x micro-batches x MoE layers x (up, down) x (per row, transposed)
    assert packs == [] and len(per_call_forms) == 3 * 2 * moe_layers * 2 * 2
    per_call_forms.clear()
    _, gathered = run("gathered", True)
    assert len(packs) == 3 * moe_layers * 2  # steps x MoE layers x (up, down): once per step
    assert per_call_forms == []  # every product took the gathered forms
    assert gathered == per_call and len(gathered) == 3
    # the checkpoint's expert weights are plain tensors: a run without FP8 resumes from it
    ckpt = tmp_path / "gathered" / "ckpt" / "iter_0000002"
    resumed, losses = run("resumed", False, fp8_on=False, load=str(ckpt), save=str(tmp_path / "r"))
    assert resumed.resumed_from.endswith("iter_0000002") and len(losses) == 1


@pytest.mark.parametrize("world", [1, 2])
def test_gathered_fp8_forms_are_the_experts_own_quantizations(world):
    """`pack_forms` / `unpack_forms`: the per-row form and its scales are `rowwise(w)`'s and the
    transposed form `quantize_transposed(w, largest row scale)`'s, bit for bit, each contiguous.
    With one rank a single uint8 buffer; with several, four inputs per rank whose gathered
    outputs (each rank's whole experts concatenated along dim 0, as FSDP2's all-gather does)
    give the same forms as packing every expert on one rank."""
    from nemotron.kernels.fp8 import quantize_transposed, rowwise
    from nemotron.train.fp8_gather import pack_forms, unpack_forms

    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(4, 32, 48, generator=gen) * torch.logspace(-3, 1, 32)[None, :, None]).bfloat16()
    if world == 1:
        outputs = pack_forms(w, 1)
        assert len(outputs) == 1 and outputs[0].dtype == torch.uint8
        assert outputs[0].shape == (4 * (2 * 32 * 48 + 4 * (32 + 48)),)
    else:
        shards = [pack_forms(part, world) for part in w.chunk(world)]
        assert all(len(inputs) == 4 and inputs[0].shape[0] == 2 for inputs in shards)
        outputs = tuple(torch.cat(gathered) for gathered in zip(*shards))
    rows_q, rows_inv, t_q, t_inv = unpack_forms(outputs, 32, 48)
    want_q, want_inv = rowwise(w)
    want_t_q, want_t_inv = quantize_transposed(w, want_inv.amax(-1))
    for got, want in ((rows_q, want_q), (rows_inv, want_inv), (t_q, want_t_q), (t_inv, want_t_inv)):
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
        assert torch.equal(
            got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
            want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want,
        )


def test_pack_forms_of_a_rank_without_experts():
    from nemotron.train.fp8_gather import pack_forms, unpack_forms

    empty = torch.empty(0, 32, 48, dtype=torch.bfloat16)
    for world in (1, 2):
        forms = unpack_forms(pack_forms(empty, world), 32, 48)
        assert [f.shape for f in forms] == [(0, 32, 48), (0, 32), (0, 48, 32), (0, 48)]


def test_expert_master_weight_is_the_weight_to_everything_but_the_gather():
    """`ExpertMasterWeight`: in-place updates (the optimizer's) change the wrapped tensor and
    return the wrapper; views and copies stay wrapped (FSDP2's sharding, `to_empty`); arithmetic
    gives plain tensors; `plain_tensors` unwraps it in a state dict. `ExpertFp8Forms` takes no
    operation but aliasing, with an error naming the key."""
    from nemotron.train.fp8_gather import (
        ExpertFp8Forms,
        ExpertMasterWeight,
        pack_forms,
        plain_tensors,
        unpack_forms,
    )

    data = torch.randn(2, 16, 32)
    master = ExpertMasterWeight(data.clone())
    assert master.mul_(2.0) is master and torch.equal(master.data_, data * 2)
    assert isinstance(master.detach(), ExpertMasterWeight) and isinstance(master[:1], ExpertMasterWeight)
    assert isinstance(torch.empty_like(master), ExpertMasterWeight)
    total = master + 1.0
    assert type(total) is torch.Tensor and torch.equal(total, data * 2 + 1.0)
    state = plain_tensors({"w": master, "nested": {"v": master}, "step": 3})
    assert type(state["w"]) is torch.Tensor and state["w"].data_ptr() == master.data_.data_ptr()
    assert state["step"] == 3 and type(state["nested"]["v"]) is torch.Tensor
    forms = ExpertFp8Forms(*unpack_forms(pack_forms(data.bfloat16()), 16, 32), dtype=torch.bfloat16)
    assert isinstance(forms.detach(), ExpertFp8Forms) and forms.shape == (2, 16, 32)
    with pytest.raises(NotImplementedError, match="experts_fsdp_float8_all_gather=false"):
        forms + 1


_GATHER_LAYOUT = """
import sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
from nemotron.distributed import ParallelDims, ParallelismConfig, ParallelLayoutError, build_mesh, parallelize
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.fp8 import Fp8Config, apply_fp8
from models.tiny import tiny_config
arch, parallel = tiny_config(num_experts=int(sys.argv[1]), moe_top_k=2), ParallelismConfig()
mesh = build_mesh(ParallelDims.from_config(parallel, 2, arch), "cpu")
model = Nano3ForCausalLM(arch)
fp8 = Fp8Config(enabled=True, layers=["experts"], experts_fsdp_float8_all_gather=True)
apply_fp8(model, fp8, torch.device("cpu"))
try:
    parallelize(model, mesh, parallel, mixed_precision=True)
except ParallelLayoutError as err:
    print("LAYOUT ERROR", err)
else:
    print("SHARDED", [p.placements for p in model.moe_layers()[0].experts.parameters()])
"""


@pytest.mark.parametrize("experts", [3, 4])
def test_experts_fsdp_float8_all_gather_needs_whole_experts_per_rank(experts):
    """The gathered FP8 forms are packed per whole expert: over 2 data-parallel ranks (a fake
    2-rank group, one process), 3 experts are refused when the layout is applied, naming the
    key (not at the first forward); 4 shard by whole experts (dim 0)."""
    tests_dir = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _GATHER_LAYOUT, str(experts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if experts == 3:
        assert "LAYOUT ERROR train.fp8.experts_fsdp_float8_all_gather" in proc.stdout
        assert "3 experts per expert-parallel rank do not divide over 2" in proc.stdout
    else:
        assert "SHARDED [(Shard(dim=0),), (Shard(dim=0),)]" in proc.stdout, proc.stdout


def test_experts_float32_grads_reaches_the_fp8_experts_and_needs_their_gathered_forms(tmp_path):
    """`train.experts_float32_grads` means float32 expert weight gradients in both precisions:
    the FP8 experts get it from `apply_fp8_if_enabled`; with FP8 experts whose weights FSDP2
    gathers as BF16 copies (gradients BF16 whatever the product writes) it is refused by name."""
    from nemotron.train.loop import apply_fp8_if_enabled

    fp8 = Fp8Config(enabled=True, layers=["experts"], experts_weight_grad="fp8")
    cfg = make_config(tmp_path, train={"fp8": fp8, "precision": "bf16", "experts_float32_grads": True})
    cfg.data = dataclasses.replace(cfg.data, mock=True)
    with pytest.raises(
        ConfigError, match=r"^train\.experts_float32_grads: .*experts_fsdp_float8_all_gather=true"
    ):
        validate_pretrain(cfg)
    for key in (True, False):
        train = dataclasses.replace(
            cfg.train,
            fp8=dataclasses.replace(fp8, experts_fsdp_float8_all_gather=True),
            experts_float32_grads=key,
        )
        ok = dataclasses.replace(cfg, train=train)
        validate_pretrain(ok)
        model = _tiny()
        apply_fp8_if_enabled(model, ok, CPU)
        converted = [m for m in model.modules() if isinstance(m, fp8_mod.Float8GroupedExperts)]
        assert len(converted) == 2 and all(m.float32_weight_grads == key for m in converted)
    # BF16 experts (FP8 elsewhere) take the key as before
    train = dataclasses.replace(cfg.train, fp8=Fp8Config(enabled=True, layers=["mamba"]))
    validate_pretrain(dataclasses.replace(cfg, train=train))


def test_experts_fsdp_float8_all_gather_key_needs_the_experts():
    fp8 = Fp8Config(enabled=True, layers=["mamba"], experts_fsdp_float8_all_gather=True)
    problems = dict(check_fp8_config(fp8, "bf16", 1))
    assert "no 'experts'" in problems["train.fp8.experts_fsdp_float8_all_gather"]


@pytest.mark.parametrize("rows,weight_grad", [(0, "bf16"), (24, "bf16"), (24, "fp8")])
def test_float8_grouped_experts_on_gathered_forms(rows, weight_grad):
    """With weights FSDP2 gathered as FP8 forms (`ExpertFp8Forms`, no BF16 copy), the experts
    compute what they compute from the BF16 weights (bit for bit, emulated; BF16 or FP8 weight
    gradients), and a rank with no rows gets output [0, hidden] and zero weight gradients
    without a BF16 path."""
    from nemotron.train.fp8_gather import ExpertFp8Forms, pack_forms, unpack_forms

    torch.manual_seed(0)
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    experts.reset_parameters()
    plain = fp8_mod.Float8GroupedExperts(experts, emulate=True, weight_grad=weight_grad)
    gathered = fp8_mod.Float8GroupedExperts(copy.deepcopy(experts), emulate=True, weight_grad=weight_grad)
    for name in ("up_proj", "down_proj"):
        w = getattr(experts, name).detach().bfloat16()
        forms = ExpertFp8Forms(*unpack_forms(pack_forms(w), *w.shape[1:]), dtype=torch.bfloat16)
        setattr(gathered, name, nn.Parameter(forms))
    assert "FP8 forms gathered by FSDP2" in repr(gathered)
    counts = torch.tensor([rows // 2, 0, rows - rows // 2, 0])
    x = torch.randn(rows, 32).bfloat16().float()
    outs, grads = [], []
    for module in (plain, gathered):
        xi = x.clone().requires_grad_(True)
        out = module(xi, counts)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, module.up_proj.grad, module.down_proj.grad])
    assert outs[1].shape == (rows, 32)
    assert torch.equal(outs[0], outs[1])
    for got, want in zip(grads[1], grads[0]):
        assert got.shape == want.shape and torch.equal(got.float(), want.float())
    if rows == 0:
        assert grads[1][1].abs().sum() == 0 and grads[1][2].abs().sum() == 0


@pytest.mark.parametrize("float32", [False, True])
@pytest.mark.parametrize("rows_per_micro_batch", [(24, 0, 17), (24, 17, 0), (0, 0, 0)])
def test_gathered_experts_sum_fp8_weight_gradients_over_micro_batches(rows_per_micro_batch, float32):
    """Gathered FP8 forms of float32 master weights (FSDP2 without a BF16 copy) with FP8 weight
    gradients, inside `kernels.fp8.summed_weight_grads` (a step FSDP2 reduces after its last
    micro-batch): no gradient reaches autograd before the last micro-batch, and then the float32
    sum of each micro-batch's own gradient (outside the scope: rounded to BF16, or with
    `float32_weight_grads` float32), bit for bit, as FSDP2 sums BF16 experts' micro-batches; a
    micro-batch without rows (an expert-parallel rank nobody routed to) adds nothing and, when
    last, hands over the sum (zeros if no micro-batch had rows)."""
    from nemotron.kernels.fp8 import summed_weight_grads
    from nemotron.train.fp8_gather import ExpertFp8Forms, pack_forms, unpack_forms

    torch.manual_seed(0)
    experts = GroupedExperts(
        num_experts=4, hidden_size=32, ffn_hidden_size=48, init_std=0.1, output_init_std=0.05
    )
    experts.reset_parameters()
    module = fp8_mod.Float8GroupedExperts(
        experts, emulate=True, weight_grad="fp8", float32_weight_grads=float32
    )
    for name in ("up_proj", "down_proj"):
        w = getattr(experts, name).detach()  # float32 master weights
        forms = ExpertFp8Forms(*unpack_forms(pack_forms(w), *w.shape[1:]), dtype=torch.float32)
        setattr(module, name, nn.Parameter(forms))
    batches = []
    for rows in rows_per_micro_batch:
        counts = torch.tensor([rows // 2, 0, rows - rows // 2, 0])
        batches.append((torch.randn(rows, 32).bfloat16().float(), counts))

    def backward(x, counts):
        out = module(x.clone().requires_grad_(True), counts)
        out.float().square().sum().backward()

    want = {name: torch.zeros(getattr(experts, name).shape) for name in ("up_proj", "down_proj")}
    for x, counts in batches:  # each micro-batch's own gradient, summed here in float32
        module.up_proj.grad = module.down_proj.grad = None
        backward(x, counts)
        for name in want:
            grad = getattr(module, name).grad
            assert grad.dtype == torch.float32
            # a BF16 weight gradient's values unless float32 ones are asked for
            assert torch.equal(grad, grad.bfloat16().float()) == (not float32 or not grad.any())
            want[name] += grad
    module.up_proj.grad = module.down_proj.grad = None
    with summed_weight_grads() as sums:
        for index, (x, counts) in enumerate(batches):
            sums.last = index == len(batches) - 1
            backward(x, counts)
            if not sums.last:
                assert module.up_proj.grad is None and module.down_proj.grad is None
        assert sums.buffers == {}  # handed over, none held
    for name, total in want.items():
        got = getattr(module, name).grad
        assert got.dtype == torch.float32 and torch.equal(got, total), name


# ---------------------------------------------------------------------------------------------
# FP8 dispatch (train/fp8_dispatch.py)


def _fp8_moe(weight_grad: str):
    """The tiny model's first MoE layer after apply_fp8 (routed experts in FP8), and the summary."""
    model = _tiny()
    fp8 = Fp8Config(enabled=True, layers=["experts"], experts_weight_grad=weight_grad)
    summary = apply_fp8(model, fp8, CPU)
    return model.backbone.layers["1"].mixer, summary


@pytest.mark.parametrize("autocast", [False, True])
def test_fp8_dispatch_is_bit_identical_to_quantizing_in_the_experts(autocast):
    """`Fp8LocalDispatcher` (installed by apply_fp8 with FP8 weight gradients) quantizes each token
    once before the dispatch gather and has the combine write the experts' output gradient
    quantized: the MoE's output, its input gradient and every parameter gradient are those of
    the model's `LocalDispatcher` with the experts quantizing themselves, bit for bit."""
    from nemotron.models.nano3.moe import LocalDispatcher
    from nemotron.train.fp8_dispatch import Fp8LocalDispatcher

    moe, summary = _fp8_moe("fp8")
    assert type(moe.dispatcher) is Fp8LocalDispatcher
    assert summary.fp8_dispatch == ["backbone.layers.1.mixer", "backbone.layers.3.mixer"]
    assert "(2 with FP8 dispatch)" in summary.describe()
    plain = copy.deepcopy(moe)
    plain.dispatcher = LocalDispatcher(moe.router.num_experts)
    gen = torch.Generator().manual_seed(7)
    # tokens of very different magnitudes: every row gets its own scale
    x0 = torch.randn(2, 24, 32, generator=gen) * torch.logspace(-3, 2, 24)[None, :, None]
    gy = torch.randn(2, 24, 32, generator=gen)
    results = []
    for module in (moe, plain):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, aux = module(x)
        ((y.float() * gy).sum() + aux).backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        results.append((y, x.grad, grads))
    (y8, dx8, g8), (y, dx, g) = results
    assert torch.equal(y8, y) and torch.equal(dx8, dx)
    assert g8.keys() == g.keys() and len(g) >= 5
    for name in g:
        assert g8[name] is not None and torch.equal(g8[name], g[name]), name


def test_fp8_dispatch_only_with_fp8_weight_grads():
    """BF16 weight gradients take the BF16 rows: the model's dispatcher stays; and FP8 experts
    refuse FP8 rows then (one clear error, not a silent dequantization)."""
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_rows import Fp8Rows
    from nemotron.models.nano3.moe import LocalDispatcher

    moe, summary = _fp8_moe("bf16")
    assert type(moe.dispatcher) is LocalDispatcher and summary.fp8_dispatch == []
    rows = Fp8Rows(*quantize_rows(torch.randn(6, 32)))
    with pytest.raises(ValueError, match="need weight_grad='fp8'"):
        moe.experts(rows, torch.tensor([6] + [0] * 7))


def test_fp8_rows_are_their_values_to_any_other_op():
    """An `Fp8Rows` holds only FP8 values and scales; every op but the FP8 experts' reads sees the
    dequantized values (so a consumer that does not know the type computes with what it means);
    malformed parts are refused."""
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_rows import Fp8Rows, fp8_rows_parts

    x = torch.randn(5, 32) * torch.logspace(-2, 2, 5)[:, None]
    q, inv = quantize_rows(x)
    rows = Fp8Rows(q, inv)
    want = (q.float() * inv[:, None]).bfloat16()
    assert rows.dtype == torch.bfloat16 and rows.shape == (5, 32) and "Fp8Rows" in repr(rows)
    assert torch.equal(rows.dequantize(), want)
    assert type(rows + 0) is torch.Tensor and torch.equal(rows + 0, want)
    assert torch.equal(rows @ torch.eye(32, dtype=torch.bfloat16), want)
    assert torch.equal(rows.float(), want.float()) and torch.equal(rows[1:3], want[1:3])
    parts = fp8_rows_parts(rows)
    assert parts is not None and parts[0] is q and parts[1] is inv and fp8_rows_parts(x) is None
    with pytest.raises(ValueError, match="float8 e4m3"):
        Fp8Rows(x, inv)
    with pytest.raises(ValueError, match="float32 \\[R\\] inverse scales"):
        Fp8Rows(q, inv[:3])


@pytest.mark.timeout(300)
def test_fp8_dispatch_trains_under_fsdp2_without_dequantizing(tmp_path, corpus, monkeypatch):
    """Training under FSDP2 (bf16 compute weights, one rank) with FP8 weight gradients: the rows
    reach the experts in FP8 form (FSDP2's hook on the experts' inputs makes an alias of them;
    a dequantization there would cost a BF16 copy and change the values), and the losses are
    those of the model's own dispatcher, bit for bit."""
    from nemotron.kernels.fp8_rows import Fp8Rows
    from nemotron.models.nano3.moe import LocalDispatcher
    from nemotron.train import pretrain
    from nemotron.train.fp8_dispatch import Fp8LocalDispatcher
    from nemotron.train.metrics import read_metrics

    dequantized = []
    real = Fp8Rows.dequantize
    monkeypatch.setattr(Fp8Rows, "dequantize", lambda self: dequantized.append(self.shape) or real(self))
    made = []
    real_init = Fp8LocalDispatcher.__init__
    monkeypatch.setattr(Fp8LocalDispatcher, "__init__", lambda self, n: made.append(n) or real_init(self, n))

    def run(name):
        fp8 = Fp8Config(enabled=True, layers=["experts"], experts_weight_grad="fp8")
        train = {
            "train_iters": 2,
            "eval_iters": 0,
            "precision": "bf16",
            "compute_weights": "bf16",
            "fp8": fp8,
        }
        cfg = make_config(tmp_path / name, blend=corpus[0], train=train)
        pretrain(cfg, tmp_path / name / "job")
        return [r["lm_loss"] for r in read_metrics(tmp_path / name / "job") if r["kind"] == "train"]

    fp8_rows = run("fp8_rows")
    assert len(made) == TINY_MODEL["hybrid_pattern"].count("E") and dequantized == []
    monkeypatch.setattr(fp8_mod, "Fp8LocalDispatcher", lambda n: LocalDispatcher(n))
    assert run("bf16_rows") == fp8_rows and len(fp8_rows) == 2


@needs_torchao
@pytest.mark.parametrize("tuned", [False, True])
def test_autotune_casts_reaches_every_compiled_linear(monkeypatch, tuned):
    """`train.fp8.autotune_casts`: every converted linear is compiled with Inductor's kernel
    tuning options (on FP8 hardware; here a CPU standing in for one, nothing runs), none without
    it; the key needs `compile`."""
    compiled = []
    monkeypatch.setattr(fp8_mod, "fp8_hardware", lambda device: True)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(kw))
    summary = apply_fp8(_tiny(), Fp8Config(enabled=True, autotune_casts=tuned), CPU)
    assert not summary.emulated and len(compiled) == len(summary.linears) > 0
    want = fp8_mod.CAST_TUNING if tuned else None
    assert all(kw == {"dynamic": False, "options": want} for kw in compiled)
    problems = dict(check_fp8_config(Fp8Config(autotune_casts=True, compile=False), "bf16", 1))
    assert "needs train.fp8.compile=true" in problems["train.fp8.autotune_casts"]


@pytest.mark.slow  # Inductor compiles the dispatch: ~16 s
@pytest.mark.timeout(300)
def test_fp8_dispatch_under_torch_compile_moves_bf16_rows():
    """Under `torch.compile` (`train.compile`) the FP8 dispatcher hands over BF16 rows, as the
    model's does (the compiler does not trace the `Fp8Rows` made inside an autograd function):
    the compiled MoE's output and gradients equal the compiled MoE with the model's dispatcher."""
    from nemotron.models.nano3.moe import LocalDispatcher

    moe, _ = _fp8_moe("fp8")
    plain = copy.deepcopy(moe)
    plain.dispatcher = LocalDispatcher(moe.router.num_experts)
    x0 = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(8))
    results = []
    for module in (moe, plain):
        x = x0.clone().requires_grad_(True)
        y, aux = torch.compile(module)(x)
        (y.square().mean() + aux).backward()
        results.append((y, x.grad, [p.grad for p in module.parameters()]))
    (y8, dx8, g8), (y, dx, g) = results
    assert torch.equal(y8, y) and torch.equal(dx8, dx)
    assert all(torch.equal(a, b) for a, b in zip(g8, g, strict=True))
