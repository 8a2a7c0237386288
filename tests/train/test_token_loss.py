"""The step's loss is the mean over tokens of the global batch, not over ranks or micro-batches:
with uneven loss masks across 2 gloo ranks and several micro-batches per rank, the loss, the
gradients (seen through an SGD step with lr 1) and the eval loss equal a single-process run on
the same global batch in one micro-batch."""

from __future__ import annotations

import pytest
import torch
from distributed._spawn import run_distributed
from torch.distributed.tensor import DTensor

from nemotron.train.loop import build_model, evaluate, train_step

from .conftest import VOCAB, make_config

SEQ = 16
MASKED_TOKENS = [16, 2, 9, 0]  # loss tokens of the 4 samples: very uneven, one sample has none


def global_batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    mask = torch.zeros(4, SEQ)
    for i, n in enumerate(MASKED_TOKENS):
        mask[i, torch.randperm(SEQ, generator=g)[:n]] = 1.0
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def micro_batches(rows):
    batch = global_batch()
    return [{k: v[r : r + 1] for k, v in batch.items()} for r in rows]


def run(cfg, batches, eval_batches, parallel_ranks=False):
    model, parallel = build_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(
        model,
        optimizer,
        batches,
        device=torch.device("cpu"),
        precision="fp32",
        grad_clip=0.0,
        parallel=parallel,
    )
    grads = {}  # lr 1: the update is minus the gradient
    for name, p in model.named_parameters():
        delta = before[name] - p.detach()
        grads[name] = delta.full_tensor() if isinstance(delta, DTensor) else delta
    eval_loss = evaluate(model, eval_batches, device=torch.device("cpu"), precision="fp32", parallel=parallel)
    return result.loss, result.lm_loss, result.grad_norm, grads, eval_loss


def _rank_run(rank, world, cfg):
    # Each rank: two micro-batches of one sample (rank 0: samples 0, 1; rank 1: samples 2, 3).
    rows = [2 * rank, 2 * rank + 1]
    loss, lm, norm, grads, eval_loss = run(cfg, micro_batches(rows), micro_batches(rows))
    return loss, lm, norm, {k: v.numpy() for k, v in grads.items()}, eval_loss  # picklable


def _config(tmp_path):
    return make_config(tmp_path, train={"global_batch_size": 4, "micro_batch_size": 1, "seq_length": SEQ})


@pytest.mark.timeout(300)
def test_two_ranks_with_uneven_masks_match_one_process_on_the_global_batch(tmp_path):
    cfg = _config(tmp_path)
    whole = [global_batch()]
    ref_loss, ref_lm, ref_norm, ref_grads, ref_eval = run(cfg, whole, whole)
    # The token mean is not the mean of per-sample means here (the test would be vacuous else).
    per_sample = run(cfg, micro_batches(range(4)), micro_batches(range(4)))
    assert per_sample[1] == pytest.approx(ref_lm, rel=1e-5)
    assert per_sample[4] == pytest.approx(ref_eval, rel=1e-5)

    for loss, lm, norm, grads, eval_loss in run_distributed(_rank_run, 2, cfg):
        assert lm == pytest.approx(ref_lm, rel=1e-5)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-4)
        assert eval_loss == pytest.approx(ref_eval, rel=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(torch.from_numpy(grads[name]), grad, rtol=1e-4, atol=1e-7, msg=name)


def test_micro_batches_of_one_process_are_weighted_by_tokens(tmp_path):
    cfg = _config(tmp_path)
    whole = [global_batch()]
    _, ref_lm, _, ref_grads, ref_eval = run(cfg, whole, whole)
    _, lm, _, grads, eval_loss = run(cfg, micro_batches(range(4)), micro_batches(range(4)))
    # A mean of per-micro-batch means would differ a lot: 0-token and 2-token samples count 1/4.
    means = [run(cfg, micro_batches([i]), micro_batches([i]))[1] for i in range(3)]
    assert abs(sum(means) / 4 - ref_lm) > 0.1
    assert lm == pytest.approx(ref_lm, rel=1e-5) and eval_loss == pytest.approx(ref_eval, rel=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_train_step_marks_its_phases_for_the_profiler(tmp_path):
    """`train_step` marks each micro-batch's forward and backward, the gradient norm and the
    optimizer step as profiler ranges (`STEP_PHASE_PREFIX`), in that order: what
    `benchmarks/train_throughput.py` charges the GPU's idle time to."""
    from torch.profiler import ProfilerActivity, profile

    from nemotron.train.loop import STEP_PHASE_PREFIX

    model, parallel = build_model(make_config(tmp_path), torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(
            model,
            optimizer,
            micro_batches([0, 1]),
            device=torch.device("cpu"),
            precision="fp32",
            grad_clip=1.0,
            parallel=parallel,
        )
    phases = sorted(
        (e.time_range.start, e.name[len(STEP_PHASE_PREFIX) :])
        for e in prof.events()
        if e.name.startswith(STEP_PHASE_PREFIX)
    )
    assert [name for _, name in phases] == [
        "micro-batch 0 forward",
        "micro-batch 0 backward",
        "micro-batch 1 forward",
        "micro-batch 1 backward",
        "gradient norm and clipping",
        "optimizer step",
    ]
