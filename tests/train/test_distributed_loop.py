"""The loop on two gloo processes (data parallel, FSDP2 via nemotron.distributed): both ranks
agree, rank 0 writes metrics and checkpoints, and the losses match a single-process run."""

import pickle

import pytest
import torch
import torch.distributed as dist
from distributed._spawn import run_distributed

from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train import pretrain
from nemotron.train.checkpoint import load_checkpoint
from nemotron.train.metrics import read_metrics
from nemotron.train.optimizer import build_optimizer

from .conftest import make_config


def _worker(rank, world, cfg_bytes, job_dir):
    """pretrain in the process group the harness made (as a caller that made its own)."""
    summary = pretrain(pickle.loads(cfg_bytes), job_dir)
    return summary.final_loss, summary.steps, summary.checkpoint


def test_two_rank_data_parallel_matches_single_process(tmp_path, corpus):
    cfg = make_config(
        tmp_path, blend=corpus[0], train={"train_iters": 4, "eval_iters": 0}, checkpoint={"save_interval": 4}
    )
    single = make_config(
        tmp_path / "single",
        blend=corpus[0],
        train={"train_iters": 4, "eval_iters": 0},
        checkpoint={"save_interval": 4},
    )
    pretrain(single, tmp_path / "single" / "job")

    results = run_distributed(_worker, 2, pickle.dumps(cfg), str(tmp_path / "job"))
    assert results[0] == results[1]  # every rank reports the same step, loss, checkpoint
    assert results[0][1] == 4 and results[0][2].endswith("iter_0000004")
    assert (tmp_path / "ckpt" / "iter_0000004" / ".metadata").exists()

    ours = [r["lm_loss"] for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    ref = [r["lm_loss"] for r in read_metrics(tmp_path / "single" / "job") if r["kind"] == "train"]
    assert ours == pytest.approx(ref, rel=1e-4)

    # The FSDP2 checkpoint of two ranks loads into one process (DCP reshards) and holds the
    # weights the single-process run reached.
    def loaded(save_dir):
        torch.manual_seed(7)
        model = Nano3ForCausalLM(cfg.model.arch())
        opt = build_optimizer(model, cfg.optimizer)
        state = load_checkpoint(save_dir, model, opt, restore_rng=False).train_state
        assert state["step"] == 4 and state["loader"]["consumed_train_samples"] == 16
        return model.state_dict()

    sharded, plain = loaded(tmp_path / "ckpt"), loaded(tmp_path / "single" / "ckpt")
    for name, value in plain.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _torchrun_like_worker(rank, world, cfg_bytes, job_dir):
    """What torchrun gives a process: the environment only; nobody calls init_process_group."""
    summary = pretrain(pickle.loads(cfg_bytes), job_dir)
    return summary.final_loss, summary.checkpoint, dist.is_initialized()


def test_processes_started_by_torchrun_train_as_one_job(tmp_path, corpus):
    """Regression: under torchrun each process used to train alone as "rank 0", both writing
    the same checkpoint files (FileNotFoundError on .metadata.tmp, FileExistsError on rng/).
    Async save with a checkpoint in flight across steps exercises the checkpoint's own group."""
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        train={"train_iters": 4, "eval_iters": 0},
        checkpoint={"save_interval": 2, "async_save": True},
    )
    results = run_distributed(
        _torchrun_like_worker, 2, pickle.dumps(cfg), str(tmp_path / "job"), env_only=True
    )
    assert results[0] == results[1]
    assert results[0][2] is False  # the group it created is gone again
    for step in (2, 4):
        rng = tmp_path / "ckpt" / f"iter_{step:07d}" / "rng"
        assert sorted(p.name for p in rng.iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    train = [r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # one writer, not two runs interleaved


def test_a_two_rank_ep2_checkpoint_resumes_in_one_process_where_it_stood(tmp_path, corpus):
    """Save at step 2 under DP2 x EP2 (FSDP2, experts split over the ranks), resume in one
    process: the run goes on at the same sample (consumed samples, Megatron's order: a step
    is the same global batch whatever the DP size), schedule and step, and steps 3-4 give the
    two-rank run's losses, weights, expert biases and AdamW state, tensor by tensor."""
    train = {"train_iters": 4, "eval_iters": 0, "micro_batch_size": 1}
    cfg = make_config(
        tmp_path / "ep2",
        blend=corpus[0],
        train=train,
        checkpoint={"save_interval": 2},
        model={"expert_model_parallel_size": 2},
    )
    run_distributed(_worker, 2, pickle.dumps(cfg), str(tmp_path / "ep2" / "job"))
    saved = tmp_path / "ep2" / "ckpt"
    resumed = make_config(
        tmp_path / "one",
        blend=corpus[0],
        train=train,
        checkpoint={"save_interval": 2, "load": str(saved / "iter_0000002")},
    )
    assert pretrain(resumed, tmp_path / "one" / "job").resumed_from.endswith("iter_0000002")

    def losses(job):
        return {r["step"]: r["lm_loss"] for r in read_metrics(job) if r["kind"] == "train"}

    two_ranks, one = losses(tmp_path / "ep2" / "job"), losses(tmp_path / "one" / "job")
    assert sorted(one) == [3, 4]
    assert [one[3], one[4]] == pytest.approx([two_ranks[3], two_ranks[4]], rel=1e-5)

    def final(save_dir):
        torch.manual_seed(7)
        model = Nano3ForCausalLM(cfg.model.arch())
        opt = build_optimizer(model, cfg.optimizer)
        train_state = load_checkpoint(save_dir / "iter_0000004", model, opt, restore_rng=False).train_state
        tensors = dict(model.state_dict())
        for name, param in model.named_parameters():
            tensors.update({f"optim.{name}.{k}": v for k, v in opt.state[param].items()})
        return train_state, tensors

    (state, want), (resumed_state, got) = final(saved), final(tmp_path / "one" / "ckpt")
    for key in ("step", "tokens", "schedule_tokens", "loader", "schedule"):
        assert resumed_state[key] == state[key], key
    assert any(name.endswith("expert_bias") and value.any() for name, value in want.items())
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


_TORCHRUN_WORKER = """
import pickle, sys
from nemotron.train import pretrain
summary = pretrain(pickle.loads(open(sys.argv[1], "rb").read()), sys.argv[2])
open(sys.argv[3] + f".{summary.status}", "w").write(str(summary.checkpoint))
"""


@pytest.mark.timeout(300)
def test_ctrl_c_under_torchrun_checkpoints_the_step_on_every_rank(tmp_path, corpus):
    """A terminal's Ctrl-C (SIGINT to the foreground process group: torchrun's agent, which
    starts each worker in a session of its own) is forwarded by the agent to every worker once,
    and the agent waits for them (`--shutdown-timeout`): the workers finish the step, save it
    together and return "interrupted" (`trainer.StopRequest`; before, SIGINT stopped them at
    once, saving nothing)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from nemotron.train.checkpoint import LATEST_FILE

    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        train={"train_iters": 100000, "eval_iters": 0},
        checkpoint={"save_interval": 100000},
    )
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    (tmp_path / "worker.py").write_text(_TORCHRUN_WORKER)
    job = tmp_path / "job"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path / "cfg.pkl"), str(job), str(tmp_path / "done")],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not any(r["kind"] == "train" and r["step"] >= 2 for r in _metrics(job)):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no training step within 240 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = sorted(p.name for p in tmp_path.glob("done.*"))
    assert done == ["done.interrupted"], out[-3000:]
    saved = (tmp_path / "ckpt" / LATEST_FILE).read_text().strip()
    step = int(saved.removeprefix("iter_"))
    assert step >= 2 and (tmp_path / "done.interrupted").read_text().endswith(saved), out[-3000:]
    rng = tmp_path / "ckpt" / saved / "rng"
    assert sorted(p.name for p in rng.iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def _metrics(job):
    """The job's metrics so far ([] before the run writes any; a line being written is skipped)."""
    from nemotron.train.metrics import MetricsFileError

    try:
        return read_metrics(job, on_warning=lambda message: None)
    except (FileNotFoundError, MetricsFileError):
        return []
