"""`train.experts_float32_grads` on a CUDA GPU: the Triton weight-gradient product
(`kernels.expert_wgrad_triton`, BF16 tensor cores) against a float64 product of the same
operands per expert; the experts' MLP against the BF16 experts' (`GroupedExperts.mlp`, PyTorch's
grouped GEMM) bit for bit where they compute the same thing; and a one-rank FSDP2 model whose
expert gradients come back in float32."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def _offs(counts: list[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(CUDA)


def _exact(g: torch.Tensor, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for c in counts:
        out.append(g[start : start + c].double().t() @ x[start : start + c].double())
        start += c
    return out


@pytest.mark.parametrize("config", [None, (64, 64, 32, 4, 2), (128, 256, 64, 8, 3)])
def test_triton_weight_grad_matches_a_float64_product_per_expert(config):
    from nemotron.kernels.expert_wgrad_triton import expert_weight_grad_triton

    torch.manual_seed(0)
    # empty experts, one row, rows not multiples of any tile, widths not multiples of tiles
    counts = [0, 1, 517, 64, 0, 1300, 3]
    rows, m, n = sum(counts), 200, 136
    g = (torch.randn(rows, m, device=CUDA) * 1e-3).bfloat16()
    x = torch.randn(rows, n, device=CUDA).bfloat16()
    out = expert_weight_grad_triton(g, x, _offs(counts), config=config)
    assert out.dtype == torch.float32 and out.shape == (len(counts), m, n)
    for e, exact in enumerate(_exact(g, x, counts)):
        if counts[e] == 0:
            assert not out[e].any(), e
            continue
        err = float((out[e].double() - exact).norm() / exact.norm())
        # float32 sums (1.3e-6 at 1,300 rows on an H200); BF16 output rounding alone is ~2e-3
        assert err < 1e-5, (e, err)
    twice = out.clone()
    expert_weight_grad_triton(g, x, _offs(counts), accumulate_into=twice, config=config)
    torch.testing.assert_close(twice, 2 * out, rtol=1e-6, atol=0)


def test_experts_mlp_matches_the_bf16_experts_and_keeps_float32_weight_gradients():
    from nemotron.models.nano3.moe import GroupedExperts
    from nemotron.train.expert_grads import ExpertBf16Weight, bf16_expert_mlp

    torch.manual_seed(1)
    counts = [37, 0, 300, 8, 211, 16, 0, 90]
    e, hidden, ffn = len(counts), 256, 128
    rows = sum(counts)
    up32 = torch.randn(e, ffn, hidden, device=CUDA) * 0.05
    down32 = torch.randn(e, hidden, ffn, device=CUDA) * 0.05
    x0 = torch.randn(rows, hidden, device=CUDA).bfloat16()
    g0 = torch.randn(rows, hidden, device=CUDA).bfloat16()
    counts_t = torch.tensor(counts, device=CUDA)

    up = up32.bfloat16().requires_grad_()
    down = down32.bfloat16().requires_grad_()
    x = x0.clone().requires_grad_()
    out_ref = GroupedExperts.mlp(x, counts_t, up, down)
    out_ref.backward(g0)

    up_w = torch.nn.Parameter(ExpertBf16Weight(up32.bfloat16(), torch.float32))
    down_w = torch.nn.Parameter(ExpertBf16Weight(down32.bfloat16(), torch.float32))
    x2 = x0.clone().requires_grad_()
    out = bf16_expert_mlp(x2, up_w, down_w, _offs(counts))
    out.backward(g0)
    assert torch.equal(out, out_ref)
    assert torch.equal(x2.grad, x.grad)
    assert up_w.grad.dtype == down_w.grad.dtype == torch.float32
    # the float32 gradients are BF16's before its rounding: within its half-ulp per element
    for ours, bf16 in ((up_w.grad, up.grad), (down_w.grad, down.grad)):
        torch.testing.assert_close(ours.bfloat16().float(), bf16.float(), rtol=8e-3, atol=1e-6)
        rows = ours[torch.tensor(counts) > 0]  # experts without rows have zero gradients
        assert (rows != rows.bfloat16().float()).float().mean() > 0.9  # not rounded to BF16


def test_one_rank_fsdp2_model_hands_float32_expert_gradients_to_the_optimizer(tmp_path):
    from nemotron.config.schema import ModelConfig, PretrainConfig
    from nemotron.distributed.utils import launcher_process_group
    from nemotron.train.config import TrainConfig
    from nemotron.train.expert_grads import Float32GradExperts
    from nemotron.train.loop import build_model, train_step

    model_cfg = ModelConfig(
        hybrid_pattern="ME",
        num_layers=2,
        hidden_size=256,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=8,
        mamba_head_dim=32,
        mamba_state_size=16,
        mamba_num_groups=2,
        moe_ffn_hidden_size=128,
        moe_shared_expert_hidden_size=256,
        num_experts=8,
        moe_top_k=2,
    )
    train = TrainConfig(
        train_iters=2,
        global_batch_size=2,
        micro_batch_size=1,
        seq_length=128,
        precision="bf16",
        compute_weights="bf16",
        experts_float32_grads=True,
    )
    cfg = PretrainConfig(model=model_cfg, train=train)
    tokens = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(0))
    batches = [
        {"tokens": tokens[i : i + 1, :-1], "labels": tokens[i : i + 1, 1:], "loss_mask": torch.ones(1, 128)}
        for i in range(2)
    ]
    with launcher_process_group("cuda", one_rank=True):
        model, parallel = build_model(cfg, CUDA)
        experts = [m for m in model.modules() if isinstance(m, Float32GradExperts)]
        assert len(experts) == 1
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        grads = {}
        optimizer.register_step_pre_hook(
            lambda *_: grads.update(
                {n: p.grad.to_local() for n, p in model.named_parameters() if ".experts." in n}
            )
        )
        result = train_step(
            model, optimizer, batches, device=CUDA, precision="bf16", grad_clip=1.0, parallel=parallel
        )
        assert torch.isfinite(torch.tensor(result.loss))
        assert set(grads) == {
            "backbone.layers.1.mixer.experts.up_proj",
            "backbone.layers.1.mixer.experts.down_proj",
        }
        for name, grad in grads.items():
            assert grad.dtype == torch.float32 and grad.abs().sum() > 0, name
            assert (grad != grad.bfloat16().float()).float().mean() > 0.5, name
