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


def test_failing_gpu_rank_reports_and_does_not_wait_for_its_peers(monkeypatch, capsys):
    """With NCCL, tearing the group down after an error waits for peers stuck in a collective
    this rank will never join: the error was never printed and the job hung (the 4-GPU
    whole-model run). A failing rank says so at once and skips the teardown; a clean exit
    still destroys the group."""
    import torch

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    with pytest.raises(torch.OutOfMemoryError):
        with launcher_process_group("cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    assert calls == [("init", "cpu:gloo,cuda:nccl")]
    assert capsys.readouterr().err.strip() == (
        "rank 1 failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    calls.clear()
    with launcher_process_group("cuda"):
        pass
    assert calls == [("init", "cpu:gloo,cuda:nccl"), ("destroy",)]
    calls.clear()
    with pytest.raises(ValueError):  # gloo (CPU): the teardown cannot hang; keep it
        with launcher_process_group("cpu"):
            raise ValueError("bad")
    assert calls == [("init", "gloo"), ("destroy",)]
    calls.clear()
    with pytest.raises(ValueError):  # already reported by the caller (the CLI's error line)
        with launcher_process_group("cuda", reported=(ValueError,)):
            raise ValueError("bad")
    assert calls == [("init", "cpu:gloo,cuda:nccl")] and capsys.readouterr().err == ""
