import math

import pytest
import torch

from nemotron.config.schema import ModelConfig
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.config import OptimizerConfig
from nemotron.train.optimizer import build_optimizer, set_learning_rate

from .conftest import TINY_MODEL


def tiny_model():
    torch.manual_seed(0)
    return Nano3ForCausalLM(ModelConfig(**TINY_MODEL).arch())


def groups_by_decay(optimizer):
    return {g["weight_decay"]: set(g["names"]) for g in optimizer.param_groups}


def test_recipe_defaults():
    cfg = OptimizerConfig()
    assert (cfg.lr, cfg.min_lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay) == (
        1e-3,
        1e-5,
        0.9,
        0.95,
        1e-8,
        0.1,
    )
    opt = build_optimizer(tiny_model(), cfg)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_no_decay_on_norms_biases_and_1d_params():
    model = tiny_model()
    groups = groups_by_decay(build_optimizer(model, OptimizerConfig()))
    assert set(groups) == {0.1, 0.0}
    params = dict(model.named_parameters())
    assert groups[0.1] | groups[0.0] == set(params)  # every parameter in exactly one group
    assert not groups[0.1] & groups[0.0]
    for name in groups[0.0]:
        assert params[name].ndim < 2 or name.endswith("bias") or "norm" in name, name
    for name in groups[0.1]:
        assert params[name].ndim >= 2 and not name.endswith("bias"), name
    # Spot checks: norms, Mamba's 1-D parameters and the conv bias never decay; matrices do.
    assert "backbone.norm_f.weight" in groups[0.0]
    assert any(n.endswith("A_log") for n in groups[0.0])
    assert any(n.endswith("conv1d.bias") for n in groups[0.0])
    assert "lm_head.weight" in groups[0.1] and "backbone.embeddings.weight" in groups[0.1]


def test_expert_bias_is_not_optimised():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig())
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    biases = [layer.router.expert_bias for layer in model.moe_layers()]
    assert biases and all(id(b) not in optimised for b in biases)


def test_weight_decay_really_is_0_1():
    """With zero gradients AdamW's update is pure decay: p <- p * (1 - lr * wd)."""
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig())
    set_learning_rate(opt, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = groups_by_decay(opt)[0.1]
    for name, p in model.named_parameters():
        factor = 1 - 0.01 * 0.1 if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7)
    w = dict(model.named_parameters())["lm_head.weight"]
    ratio = (w.detach() / before["lm_head.weight"]).mean().item()
    assert abs(ratio - 0.999) < 1e-6


def test_gradient_clipping_uses_the_total_norm_over_every_parameter():
    """train_step's gradient norm is the L2 norm of all gradients as one vector (routed experts,
    router, norms, embeddings alike); above `grad_clip` every gradient is scaled by
    grad_clip / (norm + 1e-6) (Megatron's clip_grad_norm), below it nothing changes. Seen
    through an optimizer that records the gradients it is handed."""
    from nemotron.train.loop import train_step

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            self.seen = {n: p.grad.clone() for n, p in self.named}

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 64, (2, 17), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}

    def step(clip):
        model = tiny_model()
        opt = Recorder(model.parameters(), lr=1.0)
        opt.named = list(model.named_parameters())
        result = train_step(model, opt, [batch], device=torch.device("cpu"), precision="fp32", grad_clip=clip)
        return result, opt.seen

    result, grads = step(0.0)  # no clipping: the raw gradients
    norm = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads.values()))
    experts = sum(float((gr.double() ** 2).sum()) for n, gr in grads.items() if ".experts." in n)
    assert experts > 1e-3 * norm**2  # the routed experts are a real part of the norm
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)

    clip = norm / 4
    clipped, clipped_grads = step(clip)
    assert clipped.grad_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    scale = clip / (clipped.grad_norm + 1e-6)
    for name, gr in grads.items():
        torch.testing.assert_close(clipped_grads[name], gr * scale, rtol=1e-5, atol=1e-9, msg=name)

    _, unclipped = step(norm * 2)
    for name, gr in grads.items():
        torch.testing.assert_close(unclipped[name], gr, rtol=0, atol=0, msg=name)

    # At the threshold, Megatron's test is the coefficient's (clip / (norm + 1e-6) < 1), not
    # norm > clip: a norm equal to grad_clip is still scaled, by clip / (clip + 1e-6); one
    # 1e-6 below the coefficient's 1 is not.
    at, at_grads = step(result.grad_norm)
    scale = result.grad_norm / (at.grad_norm + 1e-6)
    assert scale < 1.0
    assert any(not torch.equal(at_grads[n], gr) for n, gr in grads.items())
    for name, gr in grads.items():
        torch.testing.assert_close(at_grads[name], gr * scale, rtol=0, atol=0, msg=name)
    _, above = step(result.grad_norm + 2e-6)
    for name, gr in grads.items():
        torch.testing.assert_close(above[name], gr, rtol=0, atol=0, msg=name)


def test_the_production_recipe_builds_the_reported_optimizer():
    """default.yaml, loaded as the CLI loads it, gives the tech report's numbers where they act:
    the AdamW groups hold weight decay 0.1 exactly (the public recipe's ended up 0.033), betas
    0.9/0.95; WSD 8.4B warmup tokens, decay after 80% to 1e-5; bias rate 1e-3, balance loss 1e-4."""
    from pathlib import Path

    import nemotron.recipes.nano3.stage0_pretrain as recipe
    from nemotron.config.loader import load_config
    from nemotron.config.schema import PretrainConfig

    cfg = load_config(Path(recipe.__file__).parent / "config" / "default.yaml", [], PretrainConfig)
    opt = build_optimizer(tiny_model(), cfg.optimizer)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in opt.param_groups)
    s = cfg.scheduler
    assert (s.style, s.warmup_tokens, s.stable_fraction_end) == ("wsd", 8_400_000_000, 0.8)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (1e-3, 1e-5)
    assert cfg.train.expert_bias_update_rate == 1e-3 and cfg.model.moe_seq_aux_loss_coeff == 1e-4
    assert cfg.model.moe_routed_scaling_factor == 2.5


def _resumed(saved_cfg: OptimizerConfig, config_cfg: OptimizerConfig, policy: str):
    """An optimizer built from `config_cfg` into which a checkpoint of one built from
    `saved_cfg` (after one step) is loaded, as `train.checkpoint` loads it (DCP state dicts),
    then `resume_hyperparameters`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from nemotron.train.optimizer import group_settings, resume_hyperparameters

    model = tiny_model()
    saved = build_optimizer(model, saved_cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saved.step()
    model_sd, optim_sd = get_state_dict(model, saved)
    for group in optim_sd["param_groups"]:
        group["fused"] = True  # as a checkpoint written on CUDA says
    optimizer = build_optimizer(model, config_cfg)
    configured = group_settings(optimizer)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    change = resume_hyperparameters(optimizer, configured, policy, "iter_0000008")
    return optimizer, change


def test_resumed_optimizer_settings_follow_the_resume_policy():
    from nemotron.train.schedule import ScheduleChangeError

    old = OptimizerConfig()
    new = OptimizerConfig(weight_decay=0.05, beta1=0.8, eps=1e-6)
    settings = lambda opt: [(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups]  # noqa: E731
    # unchanged: nothing to say, the checkpoint's (= the config's) settings
    opt, change = _resumed(old, old, "strict")
    assert change is None and settings(opt) == [(0.1, (0.9, 0.95), 1e-8), (0.0, (0.9, 0.95), 1e-8)]
    assert all(g["fused"] is None for g in opt.param_groups)  # this (CPU) process's choice
    with pytest.raises(ScheduleChangeError) as err:
        _resumed(old, new, "strict")
    for needle in ("iter_0000008", "weight_decay 0.1 -> 0.05", "beta1 0.9 -> 0.8", "eps 1e-08 -> 1e-06"):
        assert needle in str(err.value)
    assert "beta2" not in str(err.value)  # only what changed
    opt, change = _resumed(old, new, "checkpoint")
    assert "on_resume=checkpoint" in change
    assert settings(opt) == [(0.1, (0.9, 0.95), 1e-8), (0.0, (0.9, 0.95), 1e-8)]
    opt, change = _resumed(old, new, "config")
    assert "on_resume=config" in change
    assert settings(opt) == [(0.05, (0.8, 0.95), 1e-6), (0.0, (0.8, 0.95), 1e-6)]
    # and the update really uses them: with zero gradients and zero moments AdamW only decays
    set_learning_rate(opt, 0.5)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["exp_avg"].zero_()
            opt.state[p]["exp_avg_sq"].zero_()
            p.grad = torch.zeros_like(p)
    w = opt.param_groups[0]["params"][0]
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.5 * 0.05), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "max_norm,norm,scaled",
    [
        (1.0, 4.0, True),  # coefficient 1 / (4 + 1e-6)
        (1.0, 1.0, True),  # at the threshold: 1 / (1 + 1e-6) < 1
        (1.0 + 1e-6, 1.0, False),  # coefficient exactly 1
        (1.0, 0.5, False),
        (0.0, 4.0, False),  # clipping off
        (float("inf"), 4.0, False),
        (1.0, float("inf"), False),  # non-finite: untouched (the step is skipped)
        (1.0, float("nan"), False),
    ],
)
def test_clip_coefficient_is_megatrons(max_norm, norm, scaled):
    """Megatron's clip_grad_by_total_norm_fp32: grads *= max_norm / (norm + 1e-6) when that is
    below 1; torch's clip_grads_with_norm_ would multiply by NaN at a NaN norm."""
    from nemotron.distributed.utils import scale_grads_to_norm_

    params = [
        torch.nn.Parameter(torch.ones(3)),
        torch.nn.Parameter(torch.ones(2, 2)),
        torch.nn.Parameter(torch.ones(1)),
    ]
    params[0].grad = torch.tensor([1.0, -2.0, 3.0])
    params[1].grad = torch.full((2, 2), 0.5)  # params[2] has no gradient
    before = [p.grad.clone() for p in params[:2]]
    scale_grads_to_norm_(params, max_norm, norm)
    coefficient = max_norm / (norm + 1e-6) if scaled else 1.0
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * coefficient, rtol=0, atol=0)
    assert params[2].grad is None


def test_library_clip_grad_norm_turns_off_at_zero_where_torch_zeroes_every_gradient():
    """`distributed.utils.clip_grad_norm_` follows the project's (and Megatron's `--clip-grad
    0`) rule, not torch's: max_norm 0 leaves the gradients as they are, where
    torch.nn.utils.clip_grad_norm_ multiplies them by 0. Above 0 both clip alike (the same
    coefficient, max_norm / (norm + 1e-6)); both return the norm before clipping."""
    from nemotron.distributed.utils import clip_grad_norm_

    def params():
        p = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
        p[0].grad, p[1].grad = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 4.0])
        return p

    ours, theirs = params(), params()
    norm = clip_grad_norm_(ours, 0.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 0.0)
    torch.testing.assert_close(norm, torch_norm)
    assert [p.grad.tolist() for p in ours] == [[1.0, -2.0, 3.0], [0.5, 4.0]]  # off
    assert all(float(p.grad.abs().max()) == 0.0 for p in theirs)  # torch: zeroed
    ours, theirs = params(), params()
    clip_grad_norm_(ours, 1.5)
    torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan")])
def test_negative_or_nan_max_norm_is_refused(max_norm):
    """Off is spelt 0: a negative max_norm (which torch would turn into a coefficient that
    flips every gradient) or NaN was silently taken for off."""
    from nemotron.distributed.utils import clip_grad_norm_, scale_grads_to_norm_

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        clip_grad_norm_([p], max_norm)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        scale_grads_to_norm_([p], max_norm, 5.0)
    assert p.grad.tolist() == [3.0, 4.0]
