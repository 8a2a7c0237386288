"""The training loader with background workers (data.num_workers > 0): the same micro-batches
as the synchronous loader, across the phase switch and across a resume from any position; the
state stays the consumed-samples count."""

from __future__ import annotations

import dataclasses
import multiprocessing

import pytest
import torch

from nemotron.train.data import LoaderState, TrainDataError, TrainingData, plan_batches

from .conftest import make_config


def stream(cfg, plan, steps, state=None, dp_rank=0):
    data = TrainingData(cfg.data, cfg.train, plan, 64, dp_rank=dp_rank, state=state)
    out = []
    for step in range(len(steps)):
        data.maybe_switch_phase(steps[step])
        out.append(data.next_train_batches())
        # Background worker processes read ahead only when asked for.
        assert bool(multiprocessing.active_children()) == (cfg.data.num_workers > 0)
    snapshot = LoaderState(**data.state_dict())
    data.close()
    assert not multiprocessing.active_children()
    return out, snapshot


def assert_same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for micro_a, micro_b in zip(step_a, step_b):
            assert micro_a.keys() == micro_b.keys()
            for key in micro_a:
                assert torch.equal(micro_a[key], micro_b[key]), key


@pytest.mark.parametrize("dp_rank", [0, pytest.param(1, marks=pytest.mark.slow)])  # ~25 s each
def test_workers_give_the_same_batches_and_state_across_phase_switch_and_resume(tmp_path, corpus, dp_rank):
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        phase2_blend=corpus[1],
        train={"global_batch_size": 8, "micro_batch_size": 2},
    )
    plan = plan_batches(cfg.train, dp_size=2)  # 2 micro-batches per step on each rank
    steps = list(range(plan.total_steps))  # the phase switch happens at step 4 of 8
    sync, sync_state = stream(cfg, plan, steps, dp_rank=dp_rank)

    workers = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=2))
    first, state = stream(workers, plan, steps[:3], dp_rank=dp_rank)  # "killed" after step 3
    assert state.consumed_train_samples == 24  # only what was taken, not what was prefetched
    rest, final_state = stream(workers, plan, steps[3:], state=state, dp_rank=dp_rank)
    assert_same(first + rest, sync)
    assert final_state == sync_state and final_state.phase == 2


def test_negative_workers_are_refused(tmp_path, corpus):
    cfg = make_config(tmp_path, blend=corpus[0])
    cfg.data = dataclasses.replace(cfg.data, num_workers=-1)
    with pytest.raises(TrainDataError, match="data.num_workers must be >= 0"):
        TrainingData(cfg.data, cfg.train, plan_batches(cfg.train), 64)


def test_more_loader_workers_than_the_cpus_can_run_is_one_error(tmp_path, monkeypatch):
    """data.num_workers 1000000 would fork loader processes until the machine gave out; it is
    refused when the loader is made, naming the key (16 per CPU still allowed)."""
    from nemotron.train import data as data_module

    monkeypatch.setattr(data_module, "available_cpus", lambda: 2)
    cfg = make_config(tmp_path, data={"mock": True, "num_workers": 33})
    plan = plan_batches(cfg.train, 1, cfg.data)
    with pytest.raises(
        TrainDataError, match=r"data\.num_workers 33 is more than 16 worker processes per CPU for the 2 CPUs"
    ):
        TrainingData(cfg.data, cfg.train, plan, 64)
    TrainingData(dataclasses.replace(cfg.data, num_workers=32), cfg.train, plan, 64)


def test_an_evaluation_larger_than_the_memory_is_one_error(tmp_path, monkeypatch):
    """An evaluation's micro-batches are held at once: train.eval_iters 10**9 ran out of memory
    at the first evaluation, hours in; now refused before the first step. The bound is what
    the evaluation holds on this rank: eval_iters x micro x accumulation samples of
    seq_length tokens (20 bytes a token: int64 tokens and labels, float32 mask), checked with
    the datasets before the first step."""
    from nemotron.train import data as data_module

    cfg = make_config(tmp_path, data={"mock": True}, train={"eval_iters": 3})
    plan = plan_batches(cfg.train, 1, cfg.data)
    held = 3 * plan.micro_batch_size * plan.grad_accumulation * plan.seq_length * 20
    data = TrainingData(cfg.data, cfg.train, plan, 64)
    batches = data.next_valid_batches()
    assert batches is not None
    assert sum(t.nbytes for b in batches for t in b.values()) == held  # the bound, tensor by tensor
    monkeypatch.setattr(data_module, "physical_memory", lambda: held - 1)
    with pytest.raises(
        TrainDataError, match=r"train\.eval_iters 3: an evaluation holds its 12 samples of 16 tokens"
    ):
        TrainingData(cfg.data, cfg.train, plan, 64).open_datasets()
    monkeypatch.setattr(data_module, "physical_memory", lambda: held)
    TrainingData(cfg.data, cfg.train, plan, 64).open_datasets()
