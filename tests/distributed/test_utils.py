"""`launcher_process_group`: joins torchrun's group only when the environment describes one
(or a one-rank group on request)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from nemotron.distributed.utils import launcher_process_group


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with launcher_process_group("cpu") as distributed:
        assert distributed is False and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with launcher_process_group("cpu") as distributed:
        assert distributed is False and not dist.is_initialized()


def test_one_rank_group_on_request(monkeypatch):
    """FSDP2 on a one-device mesh (train.compute_weights=bf16) needs a group even alone."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with launcher_process_group("cpu", one_rank=True) as distributed:
        assert distributed is True and dist.get_world_size() == 1 and dist.get_rank() == 0
        with launcher_process_group("cpu", one_rank=True) as inner:  # an existing group is used
            assert inner is True
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_incomplete_launcher_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set"):
        with launcher_process_group("cpu"):
            pass
    assert not dist.is_initialized()
