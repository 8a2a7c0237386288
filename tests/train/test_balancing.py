import pytest
import torch
from distributed._spawn import run_distributed
from torch import nn

from nemotron.train.balancing import reset_expert_counts, update_expert_biases


class FakeRouter(nn.Module):
    def __init__(self, counts):
        super().__init__()
        self.register_buffer("expert_bias", torch.zeros(len(counts)))
        self.register_buffer("tokens_per_expert", torch.tensor(counts, dtype=torch.float32), persistent=False)


class FakeMoE(nn.Module):
    def __init__(self, counts):
        super().__init__()
        self.router = FakeRouter(counts)


def test_sign_rate_and_reset():
    layers = [FakeMoE([10.0, 2.0, 4.0, 0.0]), FakeMoE([1.0, 1.0, 1.0, 1.0])]
    stats = update_expert_biases(layers, rate=1e-3)
    # mean 4: overloaded expert 0 goes down, under-loaded 1 and 3 go up, exactly-mean 2 stays.
    torch.testing.assert_close(layers[0].router.expert_bias, torch.tensor([-1e-3, 1e-3, 0.0, 1e-3]))
    torch.testing.assert_close(layers[1].router.expert_bias, torch.zeros(4))
    assert all(layer.router.tokens_per_expert.sum() == 0 for layer in layers)
    assert stats.max_over_mean == pytest.approx([2.5, 1.0])
    assert stats.worst_max_over_mean == pytest.approx(2.5)
    assert stats.bias_range == pytest.approx(2e-3)
    assert stats.tokens == [16.0, 4.0]
    # Second update with fresh counts accumulates on the bias, at the given rate.
    layers[0].router.tokens_per_expert.copy_(torch.tensor([0.0, 9.0, 3.0, 0.0]))
    update_expert_biases(layers, rate=0.5)
    torch.testing.assert_close(layers[0].router.expert_bias, torch.tensor([0.499, -0.499, 0.0, 0.501]))


@pytest.mark.parametrize("offset", [1, -1])
def test_sign_is_exact_at_the_recipe_scale(offset):
    """128 experts at ~1.18M token-slots each (3072 x 8192 tokens x top-6 per step): one expert
    off by one token makes the exact mean c + offset/128, so every other expert sits just
    below (above) it and must move up (down). A float32 mean (the sum, ~151M, is past float32's
    exact integers) rounds to c and gave them sign 0: no update at all."""
    experts, c = 128, 1_180_000
    counts = [float(c)] * experts
    counts[1] = float(c + offset)
    layer = FakeMoE(counts)
    update_expert_biases([layer], rate=1e-3)
    # independent: sign(sum(counts) / E - count) in exact integer arithmetic
    total = sum(int(x) for x in counts)
    expected = [1e-3 * ((total > experts * int(x)) - (total < experts * int(x))) for x in counts]
    assert layer.router.expert_bias.tolist() == pytest.approx(expected, rel=1e-6)
    assert layer.router.expert_bias[0].item() == pytest.approx(offset * 1e-3, rel=1e-6)


def test_reset_without_update():
    layer = FakeMoE([3.0, 1.0])
    reset_expert_counts([layer])
    assert layer.router.tokens_per_expert.sum() == 0 and layer.router.expert_bias.sum() == 0


def _dp_worker(rank: int, world: int) -> tuple:
    # Rank 0 alone would push expert 0 up; summed over ranks expert 0 is overloaded.
    local = [[1.0, 5.0, 2.0, 0.0], [11.0, 1.0, 2.0, 0.0]][rank]
    layer = FakeMoE(local)
    stats = update_expert_biases([layer], rate=1e-3)
    return layer.router.expert_bias.tolist(), layer.router.tokens_per_expert.tolist(), stats.tokens


def test_counts_are_summed_over_data_parallel_ranks():
    # summed counts [12, 6, 4, 0], mean 5.5
    expected = pytest.approx([-1e-3, -1e-3, 1e-3, 1e-3])
    for rank, (bias, counts, tokens) in enumerate(run_distributed(_dp_worker, 2)):
        assert bias == expected, rank
        assert counts == [0.0, 0.0, 0.0, 0.0]
        assert tokens == [22.0]


def test_sequence_balance_loss_counts_the_unbiased_top_k():
    """DeepSeek-V3's sequence-wise loss (and Megatron-Core's): f_i counts the tokens whose top-k
    of the UNBIASED sigmoid scores holds expert i; P_i the mean of the scores normalised over all
    experts. The aux-loss-free bias only picks the experts that compute; it must not enter the
    loss. Here the bias forces every token onto experts 0 and 1."""
    from nemotron.config.schema import ModelConfig
    from nemotron.models.nano3.moe import MoE

    from .conftest import TINY_MODEL

    config = ModelConfig(**TINY_MODEL).arch()
    torch.manual_seed(0)
    moe = MoE(config)
    e, k = config.num_experts, config.moe_top_k
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([10.0, 10.0] + [0.0] * (e - 2)))
        moe.router.weight.mul_(10.0)  # scores far from uniform, so the two readings differ
    x = torch.randn(3, 7, config.hidden_size)
    _, aux = moe(x)

    def reference(chosen):
        total = 0.0
        for seq in range(x.shape[0]):
            scores = torch.sigmoid(x[seq].double() @ moe.router.weight.detach().double().T)  # [S, E]
            p = (scores / scores.sum(-1, keepdim=True)).mean(0)
            f = [e / (k * x.shape[1]) * sum(int(i in chosen(s)) for s in scores) for i in range(e)]
            total += sum(f[i] * p[i].item() for i in range(e))
        return total / x.shape[0]

    unbiased = reference(lambda s: set(torch.topk(s, k).indices.tolist()))
    biased = reference(lambda s: {0, 1})
    assert abs(unbiased - biased) > 0.1  # the two readings differ here
    assert aux.item() == pytest.approx(unbiased, rel=1e-5)
    # the experts that computed were still the biased choice (the bias is not ignored)
    counts = moe.router.tokens_per_expert
    assert counts[:2].tolist() == [21.0, 21.0] and counts[2:].sum() == 0


def test_micro_batches_count_and_update_as_one_batch():
    """Gradient accumulation: a step of 4 sequences in 1, 2 or 4 micro-batches counts the same
    tokens per expert (every token once, top-k slots each) and moves the biases alike."""
    import copy

    from nemotron.config.schema import ModelConfig
    from nemotron.models.nano3.model import Nano3ForCausalLM
    from nemotron.train.config import OptimizerConfig
    from nemotron.train.loop import train_step
    from nemotron.train.optimizer import build_optimizer

    from .conftest import TINY_MODEL, VOCAB

    config = ModelConfig(**TINY_MODEL).arch()
    torch.manual_seed(0)
    model = Nano3ForCausalLM(config)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(4, 16)}
    outcomes = []
    for pieces in (1, 2, 4):
        m = copy.deepcopy(model)
        rows = 4 // pieces
        micro = [{k: v[i * rows : (i + 1) * rows] for k, v in batch.items()} for i in range(pieces)]
        train_step(
            m,
            build_optimizer(m, OptimizerConfig()),
            micro,
            device=torch.device("cpu"),
            precision="fp32",
            grad_clip=1.0,
        )
        counts = [layer.router.tokens_per_expert.clone() for layer in m.moe_layers()]
        assert all(c.sum() == 4 * 16 * config.moe_top_k for c in counts)
        update_expert_biases(m.moe_layers(), rate=1e-3)
        biases = [layer.router.expert_bias.clone() for layer in m.moe_layers()]
        # independent: the update is rate * sign(mean - count) from these counts
        for c, b in zip(counts, biases):
            torch.testing.assert_close(b, 1e-3 * torch.sign(c.mean() - c), rtol=0, atol=1e-9)
        outcomes.append((counts, biases))
    for counts, biases in outcomes[1:]:
        assert all(torch.equal(a, b) for a, b in zip(counts, outcomes[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(biases, outcomes[0][1]))
