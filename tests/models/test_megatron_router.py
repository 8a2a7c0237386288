"""The MoE router, the sequence balance loss and the expert-bias update against Megatron-Core.

The fixture (tests/models/fixtures/megatron_router.json) was computed by megatron-core 0.16.1's
`TopKRouter` (sigmoid scores, expert bias, top-k scaling factor, `seq_aux_loss`) and its
`get_updated_expert_bias` (tests/models/make_megatron_router_fixtures.py says how), so these
tests need no Megatron; `test_fixture_is_megatron_cores_own` regenerates it when megatron-core is
importable. Every case is compared per tensor: the chosen experts, the combine weights, their
gradient, the balance loss and its gradient, the per-expert counts, the updated bias.

Our router is fed the fixture's logits through an identity router weight (hidden size = number
of experts), so `Router` and `MoE` themselves are compared, not a re-derivation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemotron.kernels.moe_router import route_topk_reference
from nemotron.models.nano3 import MoE, Nano3Config
from nemotron.models.nano3.moe import Router
from nemotron.train.balancing import update_expert_biases

HERE = Path(__file__).parent
FIXTURE_PATH = HERE / "fixtures" / "megatron_router.json"
FIXTURE = json.loads(FIXTURE_PATH.read_text())
CASES = {case["name"]: case for case in FIXTURE["cases"]}
TIES = "ties in the scores"
TOP1 = "top 1"
BF16 = "bf16 logits"
# cases where the chosen experts and every value are Megatron's to the last bit (float32 logits,
# no ties, top k > 1); the others have their own tests below
EXACT = [name for name in CASES if name not in (TIES, TOP1, BF16)]


def logits_of(case: dict) -> torch.Tensor:
    """[batch, seq, E] float32 (a bf16 case's values are bf16 numbers)."""
    return torch.tensor(case["logits"], dtype=torch.float32).view(case["batch"], case["seq"], case["experts"])


def identity_router(case: dict) -> Router:
    """Our Router whose logits are its input: weight = identity, the case's expert bias."""
    e = case["experts"]
    router = Router(e, e, case["top_k"], case["scale"], 0.02)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
        router.expert_bias.copy_(torch.tensor(case["bias"]))
    return router.train()


def dense(idx: torch.Tensor, values: torch.Tensor, experts: int) -> torch.Tensor:
    """[tokens, k] -> [tokens, E] as Megatron scatters its routing probabilities."""
    return torch.zeros(idx.shape[0], experts, dtype=values.dtype).scatter(1, idx, values)


def routed(case: dict):
    """Our Router on the case: (topk_idx, weights, d(sum weights * upstream)/d logits, counts)."""
    e = case["experts"]
    x = logits_of(case).reshape(-1, e).requires_grad_(True)
    router = identity_router(case)
    out = router(x)
    upstream = torch.tensor(case["upstream"]).view(-1, e)
    (out.topk_weight * upstream.gather(1, out.topk_idx)).sum().backward()
    return out.topk_idx, out.topk_weight.detach(), x.grad, router


def moe_balance_loss(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence balance loss `MoE.forward` returns for the case's logits and its gradient
    w.r.t. them (through the identity router)."""
    b, s, e, k = case["batch"], case["seq"], case["experts"], case["top_k"]
    config = Nano3Config(
        hybrid_pattern="E",
        num_layers=1,
        hidden_size=e,
        vocab_size=8,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        num_experts=e,
        moe_top_k=k,
        moe_ffn_hidden_size=4,
        moe_shared_expert_hidden_size=4,
        moe_routed_scaling_factor=case["scale"],
        ffn_hidden_size=4,
    )
    moe = MoE(config, router=identity_router(case)).train()
    x = logits_of(case).requires_grad_(True)
    _, aux = moe(x)
    aux.backward()
    assert x.grad is not None
    return aux.detach(), x.grad.view(b * s, e)


@pytest.mark.parametrize("name", EXACT)
def test_routing_matches_megatron(name):
    case = CASES[name]
    theirs = case["megatron"]
    e = case["experts"]
    idx, weights, grad, _ = routed(case)
    chosen = dense(idx, torch.ones_like(idx, dtype=torch.int32), e)
    assert torch.equal(chosen, torch.tensor(theirs["map"], dtype=torch.int32)), "chosen experts"
    torch.testing.assert_close(dense(idx, weights, e), torch.tensor(theirs["probs"]), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, torch.tensor(theirs["grad_probs"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", EXACT + [TOP1])
def test_sequence_balance_loss_matches_megatron(name):
    """Megatron's `seq_aux_loss` (coefficient 1) and its gradient w.r.t. the logits: the
    unbiased top k, scores normalised over all experts, per sequence, averaged over the batch."""
    case = CASES[name]
    aux, grad = moe_balance_loss(case)
    torch.testing.assert_close(aux, torch.tensor(case["megatron"]["seq_aux_loss"]), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, torch.tensor(case["megatron"]["grad_aux"]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_counts_and_bias_update_match_megatron(name):
    """The router's per-expert counts of one training forward (the experts the bias chose),
    then one update at the recipe's rate: Megatron's `local_tokens_per_expert` and
    `get_updated_expert_bias`, experts at zero tokens and at the mean included."""
    case = CASES[name]
    *_, router = routed(case)
    if name != TIES:  # Megatron's tie order differs (see test_ties_choose_equal_scores)
        assert torch.equal(router.tokens_per_expert, torch.tensor(case["megatron"]["tokens_per_expert"]))
    # the update rule from Megatron's counts, whatever the tie order
    with torch.no_grad():
        router.tokens_per_expert.copy_(torch.tensor(case["megatron"]["tokens_per_expert"]))

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = router

    update_expert_biases([Layer()], FIXTURE["rate"])
    assert torch.equal(router.expert_bias, torch.tensor(case["megatron"]["updated_bias"]))
    assert not router.tokens_per_expert.any()


def test_the_hostile_cases_are_what_they_claim():
    """The fixture exercises what its names say (so a regenerated one keeps testing it)."""
    one = CASES["all tokens on one expert, experts with no token"]["megatron"]["tokens_per_expert"]
    assert one[3] == 8 and one.count(0.0) >= 4
    flip = CASES["bias flips the top k"]
    unbiased = torch.topk(logits_of(flip).view(-1, flip["experts"]), flip["top_k"]).indices
    assert not torch.equal(
        dense(unbiased, torch.ones_like(unbiased), flip["experts"]).bool(),
        torch.tensor(flip["megatron"]["map"]).bool(),
    )
    assert CASES["top k = number of experts"]["top_k"] == CASES["top k = number of experts"]["experts"]
    assert len(CASES["recipe width: 128 experts, top 6, scale 2.5"]["megatron"]["probs"][0]) == 128


def test_top1_weights_are_normalised_unlike_megatron():
    """With top k = 1 Megatron-Core does not renormalise (its weight is the sigmoid score x
    scale); transformers' NemotronH (norm_topk_prob) and we do: the weight is the scale. The
    chosen experts, the balance loss and the counts agree (tested above)."""
    case = CASES[TOP1]
    theirs = case["megatron"]
    idx, weights, _, _ = routed(case)
    assert torch.equal(
        dense(idx, torch.ones_like(idx, dtype=torch.int32), case["experts"]),
        torch.tensor(theirs["map"], dtype=torch.int32),
    )
    torch.testing.assert_close(weights, torch.full_like(weights, case["scale"]))
    scores = torch.sigmoid(logits_of(case).view(-1, case["experts"])).gather(1, idx)
    torch.testing.assert_close(
        dense(idx, scores * case["scale"], case["experts"]), torch.tensor(theirs["probs"])
    )


def test_ties_choose_equal_scores():
    """Ties: Megatron's `torch.topk` picks among equal scores in an unspecified order (on CPU the
    higher index), we the lower index (the Triton kernel's rule, the same on every device). Per
    token the chosen biased scores, and so the combine weights, are the same multiset."""
    case = CASES[TIES]
    theirs = case["megatron"]
    e = case["experts"]
    idx, weights, _, _ = routed(case)
    logits = logits_of(case).view(-1, e)
    biased = torch.sigmoid(logits) + torch.tensor(case["bias"])
    their_map = torch.tensor(theirs["map"]).bool()
    their_probs = torch.tensor(theirs["probs"])
    differ = 0
    for t in range(logits.shape[0]):
        ours_scores = biased[t, idx[t]].sort().values
        their_scores = biased[t, their_map[t]].sort().values
        assert torch.equal(ours_scores, their_scores), t
        torch.testing.assert_close(weights[t].sort().values, their_probs[t][their_map[t]].sort().values)
        differ += not torch.equal(
            dense(idx[t : t + 1], torch.ones(1, case["top_k"]), e)[0].bool(), their_map[t]
        )
        # ours: among equal scores the lower expert index
        assert (
            idx[t].tolist()
            == route_topk_reference(
                logits[t : t + 1], torch.tensor(case["bias"]), case["top_k"], case["scale"]
            )[1][0].tolist()
        )
    assert differ, "the tie case should make the two tie rules pick differently"
    all_equal = logits_of(case)[1, 0]
    assert (all_equal == 0).all() and idx[case["seq"]].tolist() == [0, 1, 2]


def test_bf16_logits_choose_megatrons_experts():
    """bf16 logits (our router computes float32 logits; a caller may still pass bf16): the same
    experts, and weights within bf16's rounding of Megatron's."""
    case = CASES[BF16]
    e = case["experts"]
    logits = logits_of(case).view(-1, e).bfloat16()
    _, idx, weights = route_topk_reference(logits, torch.tensor(case["bias"]), case["top_k"], case["scale"])
    assert weights.dtype == torch.bfloat16
    assert torch.equal(dense(idx, torch.ones_like(idx), e), torch.tensor(case["megatron"]["map"]))
    torch.testing.assert_close(
        dense(idx, weights.float(), e), torch.tensor(case["megatron"]["probs"]), rtol=1e-2, atol=0
    )


@pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None,
    reason="megatron-core is not installed (pip install --no-deps megatron-core==0.16.1 to run)",
)
def test_fixture_is_megatron_cores_own(tmp_path):
    """Regenerate the fixture with the installed Megatron-Core (a fresh process: the script
    patches torch for a CPU-only Megatron) and find the stored numbers."""
    out = tmp_path / "router.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent / "src"), *sys.path]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "make_megatron_router_fixtures.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(out.read_text())
    for stored, new in zip(FIXTURE["cases"], fresh["cases"], strict=True):
        for key, value in stored["megatron"].items():
            torch.testing.assert_close(
                torch.tensor(new["megatron"][key]),
                torch.tensor(value),
                rtol=1e-6,
                atol=0,
                msg=lambda m, k=key, n=stored["name"]: f"{n}: {k}: {m}",
            )
