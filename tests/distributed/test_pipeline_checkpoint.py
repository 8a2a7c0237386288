"""Checkpoints across pipeline sizes: saved by 2 pipeline stages, resumed by one process (and
the reverse), training continues with the same losses (DCP reshards: parameter names and
global shapes do not depend on the stage split)."""

import torch

from nemotron.train.balancing import update_expert_biases
from nemotron.train.checkpoint import Checkpointer, load_checkpoint
from nemotron.train.loop import build_model, train_step
from nemotron.train.optimizer import build_optimizer

from ._spawn import run_distributed
from .pipeline_harness import BIAS_RATE, global_batch, make_config, rank_micro_batches

SAVED, RESUMED = 2, 2


def _steps(model, opt, parallel, cfg, first: int, count: int) -> list[float]:
    losses = []
    for step in range(first, first + count):
        samples = global_batch(step, cfg.train.global_batch_size, cfg.train.seq_length, cfg.model.vocab_size)
        result = train_step(
            model,
            opt,
            rank_micro_batches(samples, parallel),
            device=torch.device("cpu"),
            precision="fp32",
            grad_clip=1.0,
            parallel=parallel,
        )
        update_expert_biases(model.moe_layers(), BIAS_RATE, parallel.balancing_group)
        losses.append(result.loss)
    return losses


def _config(pp: int, seed_offset: int = 0):
    cfg = make_config(dict(pipeline_model_parallel_size=pp))
    cfg.train.seed += seed_offset
    return cfg


def _save_then_continue(rank, world_size, pp, ckpt_dir):
    cfg = _config(pp)
    model, parallel = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.optimizer)
    _steps(model, opt, parallel, cfg, 0, SAVED)
    Checkpointer(ckpt_dir).save(SAVED, model, opt, {"step": SAVED})
    return _steps(model, opt, parallel, cfg, SAVED, RESUMED)


def _resume(rank, world_size, pp, ckpt_dir):
    cfg = _config(pp, seed_offset=11)  # other initial weights: everything must come from the file
    model, parallel = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.optimizer)
    assert load_checkpoint(ckpt_dir, model, opt).train_state["step"] == SAVED
    return _steps(model, opt, parallel, cfg, SAVED, RESUMED)


def test_resume_pp2_checkpoint_in_one_process_and_pp1_checkpoint_with_pp2(tmp_path):
    pp2_dir, pp1_dir = str(tmp_path / "pp2"), str(tmp_path / "pp1")
    expected = run_distributed(_save_then_continue, 2, 2, pp2_dir)
    assert expected[0] == expected[1]
    resumed = run_distributed(_resume, 1, 1, pp2_dir)[0]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected[0]), rtol=1e-5, atol=1e-6)

    expected = run_distributed(_save_then_continue, 1, 1, pp1_dir)[0]
    resumed = run_distributed(_resume, 2, 2, pp1_dir)
    for losses in resumed:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
