"""Every rank of a launch trains with the same config, and a stop any rank asked for is
reported as its signal on every rank (gloo processes on CPU)."""

from __future__ import annotations

import dataclasses
import signal

from nemotron.config.errors import ConfigError
from nemotron.train.loop import Parallel
from nemotron.train.trainer import StopRequest, check_ranks_agree

from ._spawn import run_distributed


def _check(rank, world_size, per_rank: bool):
    from nemotron.config.schema import PretrainConfig

    cfg = PretrainConfig()
    if per_rank:  # as `checkpoint.load=/ck_${oc.env:LOCAL_RANK}` resolves
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, load=f"/ck_{rank}")
    try:
        check_ranks_agree(cfg)
    except ConfigError as e:
        return str(e)
    return None


def test_ranks_with_different_configs_are_refused_on_every_rank():
    # Before: ranks loaded different checkpoints and trained on mixed weights (with checksums
    # off), or read different blends, with errors naming other causes.
    assert run_distributed(_check, 2, False) == [None, None]
    for message in run_distributed(_check, 2, True):
        assert message is not None and message.startswith(
            "the ranks' configs differ: checkpoint.load is '/ck_0' on rank 0 and '/ck_1' on rank 1"
        ), message


def _stop(rank, world_size):
    stop = StopRequest()
    if rank == 1:
        stop.signum = signal.SIGTERM  # as its handler records a signal to this rank only
    requested = stop.requested(Parallel())  # distributed: the launch's process group is up
    return requested, stop.agreed


def test_a_signal_to_one_rank_is_the_stop_of_every_rank():
    # Rank 0 reported "signal None" for a SIGTERM that rank 1 alone had got.
    assert run_distributed(_stop, 2) == [(True, int(signal.SIGTERM))] * 2


def test_one_process_checks_nothing():
    from nemotron.config.schema import PretrainConfig

    check_ranks_agree(PretrainConfig())  # no process group: nothing to compare, no error
