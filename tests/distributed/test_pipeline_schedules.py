"""The torch-free pipeline schedule orders, their timing and the micro-batches in flight
(`distributed.pipeline_schedules`, behind the plan's pipeline bubble), each against torch's own
schedule objects: their per-rank action lists (`pipeline_order`, built by torch's schedule
visualizer on mock stages, no process group), timed by a simulator written here."""

from __future__ import annotations

import pytest

from nemotron.distributed import pipeline_schedules as ps
from nemotron.models.nano3.config import Nano3Config
from nemotron.train import perf_model as pm

torch = pytest.importorskip("torch")
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # noqa: E402

# a rank's micro-batch (forward + backward) is 1; backward = 2 x forward, split I = W = F
SHARES = {"F": 1 / 3, "B": 2 / 3, "I": 1 / 3, "W": 1 / 3}

CASES = [
    (schedule, pp, virtual, n)
    for schedule, virtuals in (
        ("1F1B", (1,)),
        ("GPipe", (1,)),
        ("Interleaved1F1B", (2, 3)),
        ("InterleavedZeroBubble", (2, 3)),
        ("ZBVZeroBubble", (2,)),
    )
    for pp in (2, 4, 8)
    for virtual in virtuals
    for n in (8, 16)
] + [
    # fewer micro-batches than ranks / than ZBV's 2PP-1; counts that are not a multiple of PP
    ("GPipe", 4, 1, 3),
    ("Interleaved1F1B", 4, 2, 3),
    ("Interleaved1F1B", 4, 2, 6),
    ("InterleavedZeroBubble", 4, 2, 3),
    ("InterleavedZeroBubble", 2, 2, 6),
    ("ZBVZeroBubble", 4, 2, 3),
    ("ZBVZeroBubble", 8, 2, 8),
    ("ZBVZeroBubble", 3, 2, 7),
]


def torch_orders(
    schedule: str, pp: int, virtual: int, n: int, *, as_run: bool = True
) -> list[list[tuple[int, str, int]]]:
    """Each rank's computation actions in torch's `pipeline_order`, its idle slots dropped.
    `as_run`: with 1F1B's last rank as its runtime runs it (`test_orders_are_torchs`)."""
    ops = get_schedule_ops(schedule, pp, n, virtual)
    orders = [
        [
            (a.stage_index, a.computation_type.value, a.microbatch_index)
            for a in rank
            if a is not None and a.computation_type.value in ("F", "B", "I", "W")
        ]
        for rank in ops
    ]
    if schedule == "1F1B" and as_run:
        orders[-1] = [(s, k, m - (k == "F")) for s, k, m in orders[-1]]
    return orders


def reference_makespan(orders, num_stages: int, shares=SHARES, virtual: int = 1) -> float:
    """Longest path by relaxation until nothing moves: an action ends its duration after the
    later of its rank's previous action and what it consumes (F of the stage before; the
    backward of the stage after, or its own F on the last stage; W its own I)."""
    end = {a: 0.0 for order in orders for a in order}

    def inputs(a):
        stage, kind, m = a
        if kind == "F":
            return [(stage - 1, "F", m)] if stage else []
        if kind == "W":
            return [(stage, "I", m)]
        if stage == num_stages - 1:
            return [(stage, "F", m)]
        return [x for x in ((stage + 1, "B", m), (stage + 1, "I", m)) if x in end]

    changed = True
    while changed:
        changed = False
        for order in orders:
            previous = 0.0
            for a in order:
                value = max([previous] + [end[d] for d in inputs(a)]) + shares[a[1]] / virtual
                if value > end[a] + 1e-12:
                    end[a], changed = value, True
                previous = end[a]
    return max(end.values())


def reference_in_flight(order, release: str) -> int:
    held = peak = 0
    for _, kind, _ in order:
        held += kind == "F"
        held -= kind == release
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize(("schedule", "pp", "virtual", "n"), CASES)
def test_orders_are_torchs(schedule, pp, virtual, n):
    for name, count in ps.schedule_runs(schedule, pp, n):
        mine = ps.rank_orders(name, pp, virtual, count)
        theirs = torch_orders(name, pp, virtual, count, as_run=False)
        if name == "1F1B":
            # torch's 1F1B `pipeline_order` (a description; its runtime does not read it)
            # numbers the last rank's forwards 1..n: its runtime (`_step_microbatches`) runs
            # min(n, PP - r) forwards, then backward/forward pairs from micro-batch 0
            assert mine[:-1] == theirs[:-1]
            assert [(s, k, m + (k == "F")) for s, k, m in mine[-1]] == theirs[-1]
            for r, order in enumerate(mine):
                warmup = min(count, pp - r)
                expected = [(r, "F", m) for m in range(warmup)]
                for m in range(count):
                    expected.append((r, "B", m))
                    if warmup + m < count:
                        expected.append((r, "F", warmup + m))
                assert order == expected, r
        else:
            assert mine == theirs


@pytest.mark.parametrize(("schedule", "pp", "virtual", "n"), CASES)
def test_idle_time_is_the_simulation_of_torchs_orders(schedule, pp, virtual, n):
    """The plan's idle time per step (in a rank's micro-batches) against this file's
    simulation of torch's own action lists, per run training makes of the step."""
    layout = pm.Layout(pp, pp=pp, pipeline_schedule=schedule, virtual_stages=virtual)
    expected = -n
    for name, count in ps.schedule_runs(schedule, pp, n):
        expected += reference_makespan(torch_orders(name, pp, virtual, count), pp * virtual, virtual=virtual)
    assert pm.pipeline_idle(layout, n) == pytest.approx(expected, abs=1e-9)
    # the textbook bubbles where they hold: PP - 1 micro-batches for 1F1B and GPipe, 1/V of
    # that interleaved (rounds of PP micro-batches, 1F1B within), less with the W's filling
    if schedule in ("1F1B", "GPipe"):
        assert expected == pytest.approx(pp - 1)
    elif schedule == "Interleaved1F1B" and n % pp == 0:
        assert expected == pytest.approx((pp - 1) / virtual)
    elif n >= 2 * pp - 1:
        assert expected < (pp - 1) / virtual


def test_idle_time_with_recomputation_uses_its_shares():
    """With recomputation F = W = 1/4 and B = 3/4 (I = 1/2) of a rank's micro-batch."""
    shares = pm.action_shares(True)
    assert shares == {"F": 0.25, "B": 0.75, "I": 0.5, "W": 0.25}
    for schedule, virtual in (("1F1B", 1), ("InterleavedZeroBubble", 2), ("ZBVZeroBubble", 2)):
        layout = pm.Layout(4, pp=4, recompute=True, pipeline_schedule=schedule, virtual_stages=virtual)
        expected = reference_makespan(torch_orders(schedule, 4, virtual, 8), 4 * virtual, shares, virtual) - 8
        assert pm.pipeline_idle(layout, 8) == pytest.approx(expected, abs=1e-9), schedule


@pytest.mark.parametrize(("schedule", "pp", "virtual", "n"), CASES)
def test_micro_batches_in_flight_from_torchs_orders(schedule, pp, virtual, n):
    """Per rank, the most stage micro-batches held at once (freed by B, or by W when the
    backward is split), against a count over torch's action lists; a stage weighing 1."""
    layout = pm.Layout(pp, pp=pp, pipeline_schedule=schedule, virtual_stages=virtual)
    runs = [torch_orders(name, pp, virtual, count) for name, count in ps.schedule_runs(schedule, pp, n)]
    for rank in range(pp):
        expected = 0
        for orders in runs:
            order = orders[rank]
            release = "W" if any(k == "W" for _, k, _ in order) else "B"
            expected = max(expected, reference_in_flight(order, release))
        assert pm.pipeline_in_flight(layout, n, rank, {s: 1.0 for s in range(pp * virtual)}) == expected, rank
        if schedule == "1F1B" and n >= pp:
            assert expected == pp - rank
        if schedule == "GPipe":
            assert expected == n


def test_schedule_runs_are_counts_torch_accepts():
    """What `schedule_runs` hands torch is built by its classes; what it splits, they refuse."""
    for pp in (2, 4):
        for n in range(1, 3 * pp + 2):
            for schedule, virtual in (("1F1B", 1), ("Interleaved1F1B", 2), ("InterleavedZeroBubble", 2)):
                runs = ps.schedule_runs(schedule, pp, n)
                assert sum(c for _, c in runs) == n
                for name, count in runs:
                    get_schedule_ops(name, pp, count, virtual)  # raises if refused
                if len(runs) > 1 or runs[0][0] != schedule:
                    with pytest.raises(ValueError):
                        get_schedule_ops(schedule, pp, n, virtual)


def test_simulation_errors_are_schedule_errors():
    with pytest.raises(ps.ScheduleError, match="deadlocks"):
        ps.simulate([[(0, "B", 0), (0, "F", 0)], [(1, "F", 0), (1, "B", 0)]], 2, lambda a: 1.0)
    with pytest.raises(ps.ScheduleError, match="no rank runs"):
        ps.simulate([[(1, "F", 0)]], 2, lambda a: 1.0)
    with pytest.raises(ps.ScheduleError, match="1F1B needs at least"):
        ps.rank_orders("1F1B", 4, 1, 3)
    with pytest.raises(ps.ScheduleError, match="rounds"):
        ps.rank_orders("Interleaved1F1B", 2, 2, 5)
    with pytest.raises(ps.ScheduleError, match="stages per rank"):
        ps.rank_orders("ZBVZeroBubble", 2, 3, 4)
    with pytest.raises(ps.ScheduleError, match="unknown"):
        ps.rank_orders("DualPipeV", 2, 2, 4)


def test_plan_interleaved_and_zero_bubble_are_their_own():
    """Same layout, same stages' work: Interleaved1F1B's bubble is half of 1F1B's idle time
    (V=2) and holds more micro-batches; the zero-bubble schedules idle less still."""
    cfg, shape = Nano3Config(), pm.RunShape(global_batch_size=512)
    plans = {
        s: pm.estimate(cfg, pm.Layout(64, ep=8, pp=4, pipeline_schedule=s), shape)
        for s in ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
    }
    one = plans["1F1B"]
    n = one.grad_accumulation
    per_micro = (one.step.compute + one.step.expert_parallel) / n  # no TP or CP here
    sends = one.step.pipeline_bubble - 3 * per_micro
    assert sends > 0
    inter = plans["Interleaved1F1B"]
    inter_micro = (inter.step.compute + inter.step.expert_parallel) / n
    assert inter.step.pipeline_bubble == pytest.approx(1.5 * inter_micro + sends, rel=1e-6)
    assert inter.step.pipeline_bubble < one.step.pipeline_bubble
    for s in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        assert plans[s].step.pipeline_bubble < inter.step.pipeline_bubble, s
    assert inter.memory.activations > one.memory.activations
    for p in plans.values():
        assert not any("not modelled" in w for w in p.warnings)
        assert any(w.startswith("PP4: uncalibrated") for w in p.warnings)
