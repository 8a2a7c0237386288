"""What each pipeline schedule training runs does, per rank and in order, and what that costs:
the idle time of a step and the micro-batches whose activations a rank holds.

The orders are those of torch.distributed.pipelining (torch 2.13) without its idle slots: the
computation actions of each rank's `pipeline_order` (`F` forward, `B` full backward, `I`
input-gradient backward, `W` weight-gradient backward), which torch's runtime runs in that order,
each waiting for what it consumes. They are rebuilt here, torch-free, so that `nemotron nano3
plan` and a dry run (which never import torch) can time them; `tests/distributed/
test_pipeline_schedules.py` checks every order against torch's own schedule objects.

`simulate` times the orders: an action starts when its rank is free and its input is there
(F of stage s after F of stage s-1 for that micro-batch; B/I of stage s after B/I of stage s+1,
and after its own F; W after its own I), and takes the duration given for its kind. The step's
idle time is the makespan minus a rank's own work. Sends are not in it (the performance model
counts them on the critical path separately).

`peak_in_flight` walks each rank's order: a forward stores a micro-batch's activations of that
stage; a full backward frees them; with the backward split, they are freed by W, not by I:
torch's `stage_backward_input` runs autograd with `retain_graph=True` and keeps the
weight-gradient part of the graph (whose nodes reach every saved tensor down to the stage's
inputs) until `stage_backward_weight` (measured on an MLP stage in torch 2.13: all of the
stage's saved activations are still alive after I, and gone after W).

Also the one home of which torch schedule runs how many micro-batches (`schedule_runs`): 1F1B
refuses fewer micro-batches than stages (run as GPipe), the interleaved schedules refuse a count
that is not a multiple of its rounds (run as two steps).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nemotron.distributed.pipeline_split import SCHEDULES

# (stage, kind, micro-batch); kind: "F" forward, "B" full backward, "I" input-gradient
# backward, "W" weight-gradient backward
Action = tuple[int, str, int]

INTERLEAVED = ("Interleaved1F1B", "InterleavedZeroBubble")


class ScheduleError(ValueError):
    """A schedule, layout or micro-batch count torch's schedules do not build."""


def schedule_runs(schedule: str, pp: int, count: int) -> list[tuple[str, int]]:
    """The torch schedule steps that run `count` micro-batches of one shape under `schedule`
    on `pp` ranks: (schedule, micro-batches) per step. 1F1B refuses fewer micro-batches than
    stages: such a group runs as GPipe (with so few micro-batches the two run the same
    order). torch's interleaved schedules run rounds of PP micro-batches and refuse a count
    that is not a multiple of its number of rounds, max(1, count // PP) (5 on PP 2): such a
    count runs as the largest multiple of PP and the rest (fewer than PP: one round)."""
    if count < 1:
        raise ScheduleError(f"a schedule step runs at least one micro-batch, got {count}")
    if schedule == "1F1B" and count < pp:
        return [("GPipe", count)]
    if schedule in INTERLEAVED and count % max(1, count // pp) != 0:
        return [(schedule, count - count % pp), (schedule, count % pp)]
    return [(schedule, count)]


def rank_orders(schedule: str, pp: int, stages_per_rank: int, n_micro: int) -> list[list[Action]]:
    """Each rank's computation actions in the order torch's `schedule` runs them (its
    `pipeline_order` without idle slots) for `n_micro` micro-batches on `pp` ranks of
    `stages_per_rank` stages each."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {schedule!r}: one of {list(SCHEDULES)}")
    if pp < 1 or n_micro < 1:
        raise ScheduleError(f"a schedule needs PP >= 1 and a micro-batch, got PP {pp}, {n_micro}")
    single = schedule in ("1F1B", "GPipe")
    if (single and stages_per_rank != 1) or (not single and stages_per_rank < 2):
        raise ScheduleError(f"{schedule} does not run {stages_per_rank} stages per rank")
    if schedule == "GPipe":
        return [
            [(r, "F", m) for m in range(n_micro)] + [(r, "B", m) for m in range(n_micro)] for r in range(pp)
        ]
    if schedule == "1F1B":
        if n_micro < pp:
            raise ScheduleError(f"1F1B needs at least as many micro-batches as stages ({pp}), got {n_micro}")
        return [_one_f_one_b(pp, r, n_micro) for r in range(pp)]
    if schedule == "ZBVZeroBubble":
        if stages_per_rank != 2:
            raise ScheduleError(f"ZBVZeroBubble runs exactly 2 stages per rank, not {stages_per_rank}")
        return [_zbv(pp, r, n_micro) for r in range(pp)]
    rounds = max(1, n_micro // pp)
    if n_micro % rounds:
        raise ScheduleError(
            f"{schedule} needs a multiple of its {rounds} rounds of micro-batches, got {n_micro}"
        )
    return [
        _interleaved(pp, r, stages_per_rank, n_micro, schedule == "InterleavedZeroBubble") for r in range(pp)
    ]


def _one_f_one_b(pp: int, rank: int, n: int) -> list[Action]:
    # Schedule1F1B._get_pipeline_order: PP-1-r forwards, then forward/backward pairs, then
    # the remaining backwards
    warmup = pp - 1 - rank
    out: list[Action] = [(rank, "F", m) for m in range(warmup)]
    for m in range(n - warmup):
        out += [(rank, "F", warmup + m), (rank, "B", m)]
    return out + [(rank, "B", m) for m in range(n - warmup, n)]


def _interleaved(pp: int, rank: int, local: int, n: int, zero_bubble: bool) -> list[Action]:
    # ScheduleInterleaved1F1B / ScheduleInterleavedZeroBubble._calculate_single_rank_operations
    # and _get_1f1b_rank_ops (torch 2.13), idle slots left out
    per_round = n // max(1, n // pp)
    warmup = min((local - 1) * per_round + (1 if zero_bubble else 2) * (pp - 1 - rank), n * local)
    total = n * local  # forwards (and backwards) of this rank
    one_f_one_b = total - warmup

    def forward_stage(step: int) -> int:
        return (step // per_round) % local * pp + rank

    def backward_stage(step: int) -> int:
        return (local - 1 - ((step - warmup) // per_round) % local) * pp + rank

    nxt: dict[tuple[str, int], int] = {}

    def take(kind: str, stage: int) -> Action:
        m = nxt.get((kind, stage), 0)
        nxt[(kind, stage)] = m + 1
        return (stage, kind, m)

    backward = "I" if zero_bubble else "B"
    backward_steps: list[int] = []
    weights_done = 0
    out: list[Action] = []
    for step in range(warmup + one_f_one_b + warmup):
        if step < warmup:
            out.append(take("F", forward_stage(step)))
            continue
        if step < warmup + one_f_one_b:
            out.append(take("F", forward_stage(step)))
        out.append(take(backward, backward_stage(step)))
        backward_steps.append(step)
        # ZB1P: rank r delays its weight gradients by r backwards
        if zero_bubble and step - warmup >= rank:
            out.append(take("W", backward_stage(backward_steps[weights_done])))
            weights_done += 1
    while zero_bubble and weights_done < len(backward_steps):
        out.append(take("W", backward_stage(backward_steps[weights_done])))
        weights_done += 1
    return out


def _zbv(pp: int, rank: int, n: int) -> list[Action]:
    # ScheduleZBVZeroBubble._calculate_single_rank_operations (torch 2.13): built for at least
    # 2PP-1 micro-batches, the actions of the ones beyond `n` then dropped
    total = max(2 * pp - 1, n)
    first, second = rank, 2 * pp - 1 - rank
    count = {(s, k): 0 for s in (first, second) for k in "FIW"}
    out: list[Action] = []

    def put(stage: int, kind: str, index: int | None = None) -> None:
        key = (stage, kind)
        m = count[key] if index is None else index
        out.append((stage, kind, m))
        if index is None:
            count[key] += 1

    for _ in range(2 * (pp - rank) - 1):
        put(first, "F")
    for _ in range(rank):
        put(second, "F")
        put(first, "F")
    for _ in range(pp - rank):
        put(second, "F")
        put(second, "I")
        put(second, "W")
    while count[(second, "F")] < count[(first, "F")] or count[(first, "F")] < total:
        if count[(first, "F")] < total:
            put(first, "F")
        put(first, "I")
        put(first, "W")
        put(second, "F")
        put(second, "I")
        put(second, "W")
    w_first, w_second = count[(first, "I")], count[(second, "I")]
    for _ in range(rank):
        put(first, "I")
        put(second, "I")
    for _ in range(pp - rank):
        put(first, "I")
        put(first, "W", w_first)
        w_first += 1
    while w_second < count[(second, "I")]:
        put(second, "W", w_second)
        w_second += 1
    while w_first < count[(first, "I")]:
        put(first, "W", w_first)
        w_first += 1
    return [a for a in out if a[2] < n]


@dataclass(frozen=True)
class Timeline:
    """A simulated schedule step: when each rank's actions end."""

    makespan: float  # from the first action's start to the last one's end
    busy: tuple[float, ...]  # each rank's computing time

    @property
    def idle(self) -> tuple[float, ...]:
        """Each rank's time without work within the step."""
        return tuple(self.makespan - b for b in self.busy)


def simulate(
    orders: Sequence[Sequence[Action]], num_stages: int, duration: Callable[[Action], float]
) -> Timeline:
    """Time the ranks' `orders` (`rank_orders`): each action starts when its rank has ended
    the previous one and what it consumes is done, and lasts `duration(action)`."""
    where = {a: (r, i) for r, order in enumerate(orders) for i, a in enumerate(order)}
    if len(where) != sum(len(o) for o in orders):
        raise ScheduleError("an action appears twice in the schedule")

    def needs(a: Action) -> list[Action]:
        stage, kind, m = a
        if kind == "F":
            return [(stage - 1, "F", m)] if stage > 0 else []
        if kind in ("B", "I"):
            after = [(stage, "F", m)]
            if stage < num_stages - 1:
                upstream = (stage + 1, "B", m) if (stage + 1, "B", m) in where else (stage + 1, "I", m)
                after.append(upstream)
            return after
        return [(stage, "I", m)]  # W

    end: dict[Action, float] = {}
    free = [0.0] * len(orders)
    position = [0] * len(orders)
    # a rank waits on another only through a dependency: sweep the ranks until none advances
    pending = deque(range(len(orders)))
    waiting: dict[Action, list[int]] = {}
    while pending:
        r = pending.popleft()
        order = orders[r]
        while position[r] < len(order):
            a = order[position[r]]
            deps = needs(a)
            missing = next((d for d in deps if d not in end), None)
            if missing is not None:
                if missing not in where:
                    raise ScheduleError(f"action {a} needs {missing}, which no rank runs")
                waiting.setdefault(missing, []).append(r)
                break
            start = max([free[r]] + [end[d] for d in deps])
            end[a] = free[r] = start + duration(a)
            position[r] += 1
            pending.extend(waiting.pop(a, ()))
    if len(end) != len(where):
        stuck = [orders[r][position[r]] for r in range(len(orders)) if position[r] < len(orders[r])]
        raise ScheduleError(f"the schedule deadlocks: ranks wait on {stuck}")
    busy = tuple(sum(duration(a) for a in order) for order in orders)
    return Timeline(makespan=max(free), busy=busy)


def peak_in_flight(
    orders: Sequence[Sequence[Action]], weight: Callable[[int], float] = lambda s: 1.0
) -> list[float]:
    """Per rank, the most micro-batch activations it holds at once, each stage's counted as
    `weight(stage)`: a forward stores them, a full backward (B) or the weight-gradient backward
    (W) frees them (see the module's note on I)."""
    split = any(kind == "W" for order in orders for _, kind, _ in order)
    release = "W" if split else "B"
    out = []
    for order in orders:
        held = peak = 0.0
        for stage, kind, _ in order:
            if kind == "F":
                held += weight(stage)
                peak = max(peak, held)
            elif kind == release:
                held -= weight(stage)
        out.append(peak)
    return out
