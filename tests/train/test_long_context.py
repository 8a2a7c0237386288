"""The long-context phase in the loop: mixed sequence lengths in one step with the loss
normalised over tokens, context-parallel slicing in the loader, weights-only start from a
pretraining checkpoint (checkpoint.finetune), and the tiny long-context recipe trained by
`torchrun --nproc-per-node 2` with context parallelism 2, matching one process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemotron.data.config import SequenceLengthBlend
from nemotron.distributed.context_parallel import cp_shard
from nemotron.kernels.cross_entropy import IGNORE_INDEX
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train import pretrain
from nemotron.train.checkpoint import load_checkpoint
from nemotron.train.data import TrainDataError, TrainingData, collate, plan_batches
from nemotron.train.loop import train_step
from nemotron.train.metrics import read_metrics

from .conftest import TINY_MODEL, make_config

SRC = Path(__file__).resolve().parents[2] / "src"


def mixed(cfg, corpus_blend, short: int = 4, weight: float = 1.0):
    data = dataclasses.replace(
        cfg.data,
        mixed_length_blends=[SequenceLengthBlend(blend=str(corpus_blend), seq_length=short, weight=weight)],
    )
    return dataclasses.replace(cfg, data=data)


def test_collate_pads_shorter_samples():
    long = {"tokens": torch.arange(6), "labels": torch.arange(1, 7), "loss_mask": torch.ones(6)}
    short = {"tokens": torch.arange(2), "labels": torch.arange(1, 3), "loss_mask": torch.ones(2)}
    batch = collate([long, short])
    assert batch["tokens"][1].tolist() == [0, 1, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [1, 2] + [IGNORE_INDEX] * 4
    assert batch["loss_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]
    assert torch.equal(batch["tokens"][0], long["tokens"])


def test_loader_mixes_lengths_and_slices_for_context_parallel(tmp_path, corpus):
    cfg = mixed(
        make_config(tmp_path, blend=corpus[0], train={"micro_batch_size": 1, "global_batch_size": 4}),
        corpus[0],
    )
    plan = plan_batches(cfg.train, 1, cfg.data)
    assert plan.tokens_per_step == 4 * (16 + 4) // 2  # the mean sample length at weights 1:1
    full = TrainingData(cfg.data, cfg.train, plan, 64)
    batches = full.next_train_batches()
    assert sorted(b["tokens"].shape[1] for b in batches) == [4, 4, 16, 16]
    assert full.last_step_tokens == 40
    for cp_rank in range(2):
        part = TrainingData(cfg.data, cfg.train, plan, 64, cp_rank=cp_rank, cp_size=2, sequence_multiple=4)
        for whole, mine in zip(batches, part.next_train_batches()):
            for key in whole:
                assert torch.equal(mine[key], cp_shard(whole[key], cp_rank, 2))
    with pytest.raises(
        TrainDataError,
        match=r"mixed_length_blends\[0\].seq_length=4 must be a "
        r"positive multiple of 8",
    ):
        TrainingData(cfg.data, cfg.train, plan, 64, cp_size=4, sequence_multiple=8)
    # samples of 4 tokens split over CP 2 are chunks of 1: too short for a Mamba conv's 3
    # positions of context (`pretrain` passes its model's); said before any step, naming the key
    with pytest.raises(
        TrainDataError,
        match=r"^data.mixed_length_blends\[0\].seq_length=4 is too short for model.context_parallel_size=2",
    ):
        TrainingData(cfg.data, cfg.train, plan, 64, cp_size=2, sequence_multiple=4, context_halo=3)
    # without context parallel the pieces are TP's alone (the message said "2*CP*TP = 8")
    with pytest.raises(
        TrainDataError, match=r"seq_length=4 must be a positive multiple of 8: not divisible by TP = 8 "
    ):
        TrainingData(cfg.data, cfg.train, plan, 64, sequence_multiple=8)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # workers: ~17 s
def test_data_parallel_ranks_get_the_same_mix_of_lengths(tmp_path, corpus, workers):
    """The LC phase's 1:1 mix interleaves long and short samples; Megatron's per-micro-step
    interleaving across 2 ranks gave rank 0 every long sample and rank 1 every short one (rank 1
    idle most of each step). Each rank now reads a contiguous half of the step: 2 long + 2 short,
    the same samples in all, every sample once."""
    cfg = mixed(
        make_config(tmp_path, blend=corpus[0], train={"micro_batch_size": 1, "global_batch_size": 8}),
        corpus[0],
    )
    cfg.data = dataclasses.replace(cfg.data, num_workers=workers)
    plan = plan_batches(cfg.train, 2, cfg.data)
    reference = TrainingData(cfg.data, cfg.train, plan_batches(cfg.train, 1, cfg.data), 64)
    ranks = [TrainingData(cfg.data, cfg.train, plan, 64, dp_rank=r) for r in range(2)]
    dataset = reference.train_dataset(1)
    for step in range(3):
        per_rank = [[b["tokens"][0] for b in d.next_train_batches()] for d in ranks]
        assert [sorted(len(t) for t in mine) for mine in per_rank] == [[4, 4, 16, 16]] * 2
        # Rank r's samples, in order: the step's samples r*4 ... r*4 + 3 (independently indexed).
        for r, mine in enumerate(per_rank):
            expected = [dataset[step * 8 + r * 4 + k]["tokens"] for k in range(4)]
            assert all(torch.equal(a, b) for a, b in zip(mine, expected)), (step, r)
        assert ranks[0].last_step_tokens == ranks[1].last_step_tokens == 2 * (2 * 16 + 2 * 4)
    for d in ranks:
        d.close()


def test_step_loss_is_the_mean_over_tokens_of_mixed_lengths():
    """Micro-batches of 12 and 4 loss tokens: the gradient is that of the mean over the 16
    tokens (not the mean of the two micro-batch means)."""
    torch.manual_seed(0)
    from nemotron.config.schema import ModelConfig

    arch = ModelConfig(**TINY_MODEL, moe_seq_aux_loss_coeff=0.0).arch()
    model = Nano3ForCausalLM(arch)
    reference = Nano3ForCausalLM(arch)
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    t_long, t_short = torch.randint(0, 64, (1, 13), generator=g), torch.randint(0, 64, (1, 5), generator=g)
    batches = [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(1, t.shape[1] - 1)}
        for t in (t_long, t_short)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train_step(model, opt, batches, device=torch.device("cpu"), precision="fp32", grad_clip=0.0)
    # train_step clears the gradients after stepping: recompute the reference ones and compare
    # the reported loss (the token mean) and, through a second copy, the gradient direction.
    sums = []
    for b in batches:
        out = reference(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"])
        sums.append(out.lm_loss * b["loss_mask"].sum())
    token_mean = (sums[0] + sums[1]) / 16
    assert result.lm_loss == pytest.approx(float(token_mean), rel=1e-6)
    assert result.lm_loss != pytest.approx(float((sums[0] / 12 + sums[1] / 4) / 2), rel=1e-4)
    token_mean.backward()
    expected_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None])
    )
    assert result.grad_norm == pytest.approx(float(expected_norm), rel=1e-5)


def test_a_padded_micro_batch_trains_as_its_samples_one_by_one():
    """A micro-batch of a 12- and a 4-token sample (padded to 12) against the two as
    micro-batches of 1: the same losses, gradient and expert counts. The padding was routed
    and counted by expert balancing (counts and balance loss) before."""
    from nemotron.config.schema import ModelConfig

    arch = ModelConfig(**TINY_MODEL, moe_seq_aux_loss_coeff=0.1).arch()
    torch.manual_seed(0)
    models = [Nano3ForCausalLM(arch) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 64, (n + 1,), generator=g) for n in (12, 4)]
    samples = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(len(t) - 1)} for t in samples]
    results, counts = [], []
    for model, batches in zip(models, ([collate(samples)], [collate([s]) for s in samples])):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        results.append(
            train_step(model, opt, batches, device=torch.device("cpu"), precision="fp32", grad_clip=0.0)
        )
        counts.append([moe.router.tokens_per_expert.clone() for moe in model.moe_layers()])
    padded, alone = results
    assert padded.lm_loss == pytest.approx(alone.lm_loss, rel=1e-6)
    assert padded.loss == pytest.approx(alone.loss, rel=1e-6)  # the balance term included
    assert padded.grad_norm == pytest.approx(alone.grad_norm, rel=1e-5)
    for layer, (got, want) in enumerate(zip(*counts)):
        assert torch.equal(got, want), layer
        assert float(got.sum()) == 16 * arch.moe_top_k  # 12 + 4 tokens, no padding


def test_finetune_takes_weights_only(tmp_path, corpus):
    source = make_config(
        tmp_path / "pre",
        blend=corpus[0],
        train={"train_iters": 2, "eval_iters": 0},
        checkpoint={"save_interval": 2},
    )
    pretrain(source, tmp_path / "pre" / "job")
    cfg = make_config(
        tmp_path / "lc",
        blend=corpus[0],
        train={"train_iters": 1, "eval_iters": 0},
        checkpoint={"load": source.checkpoint.save, "finetune": True, "save_interval": 1},
        optimizer={"lr": 0.0, "min_lr": 0.0},
        scheduler={"style": "constant"},
    )
    summary = pretrain(cfg, tmp_path / "lc" / "job")
    assert summary.finetuned_from.endswith("iter_0000002") and summary.resumed_from is None
    assert summary.steps == 1  # the step count started from zero, not from the source's 2

    def weights(path):
        model = Nano3ForCausalLM(cfg.model.arch())
        state = load_checkpoint(path, model, None, restore_rng=False).train_state
        return model.state_dict(), state

    before, _ = weights(source.checkpoint.save)
    after, state = weights(cfg.checkpoint.save)  # lr 0: the loaded weights, unchanged
    assert state["step"] == 1 and state["loader"]["consumed_train_samples"] == 4
    for name, value in before.items():
        if "expert_bias" not in name:  # the bias update does not follow the LR
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


def _cli(args: list[str], cwd: Path, processes: int) -> subprocess.CompletedProcess:
    """The CLI in one plain process (`processes` 1) or under torchrun with that many."""
    env = dict(
        os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    return subprocess.run(
        launcher + ["-m", "nemotron.cli.main", "nano3", "pretrain"] + args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # 8 ranks under torchrun: ~75 s on 2 cores
def test_tiny_long_context_recipe_trains_with_pp2_tp2_and_cp2_under_torchrun(tmp_path, corpus):
    """`-c long_context_tiny` (PP2 by default) from a tiny pretraining checkpoint, mixed 48- and
    16-token samples: PP2 and CP2 on two processes, and PP2 x TP2 + SP (the recipe's PP with
    TP, in miniature) on four, give the losses of the same recipe in one process (which has
    none of them)."""
    pre = make_config(
        tmp_path / "pre",
        blend=corpus[0],
        train={"train_iters": 1, "eval_iters": 0},
        checkpoint={"save_interval": 1},
    )
    pretrain(pre, tmp_path / "pre" / "job")
    args = [
        "-c",
        "long_context_tiny",
        *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
        "train.train_iters=3",
        "train.seq_length=48",
        "train.eval_iters=1",
        "train.eval_interval=3",
        "train.global_batch_size=4",
        "logger.progress_bar=false",
        f"data.blend={corpus[0]}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.mixed_length_blends=[{{blend: {corpus[0]}, seq_length: 16, weight: 1}}]",
        f"checkpoint.load={pre.checkpoint.save}",
    ]
    layouts = {  # name: (overrides, processes)
        "pp2": ([], 2),
        "cp2": (["model.pipeline_model_parallel_size=1", "model.context_parallel_size=2"], 2),
        "pp2-tp2": (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"], 4),
        "single": ([], 1),
    }
    results = {}
    for name, (extra, processes) in layouts.items():
        job = tmp_path / name
        run = _cli(
            args + extra + [f"checkpoint.save={job / 'ckpt'}", "--job-dir", str(job / "job")],
            tmp_path,
            processes,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        metrics = read_metrics(job / "job")
        train = [r for r in metrics if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]
        results[name] = (
            [r["lm_loss"] for r in train]
            + [r["loss"] for r in train]
            + [r["loss"] for r in metrics if r["kind"] in ("eval", "test")]
        )
        config = json.loads((job / "ckpt" / "iter_0000003" / "config.json").read_text())
        assert config["model"]["pipeline_model_parallel_size"] == (2 if name != "cp2" else 1)
        # every rank wrote its shards: one distributed run, not several single ones
        shards = sorted(p.name for p in (job / "ckpt" / "iter_0000003").glob("*.distcp"))
        assert shards == [f"__{r}_0.distcp" for r in range(processes)], shards
    assert len(results["single"]) == 8  # 3 steps x (LM loss, loss), one eval, one test
    for name in ("pp2", "cp2", "pp2-tp2"):
        assert results[name] == pytest.approx(results["single"], rel=1e-4), name

    # The PP2 x TP2 checkpoint (each rank's TP shards of its stage) holds the whole model under
    # its global names and shapes: one process loads it, with the one-process run's weights.
    from nemotron.config.schema import ModelConfig

    def weights(name: str) -> dict[str, torch.Tensor]:
        model = Nano3ForCausalLM(ModelConfig(**TINY_MODEL).arch())
        load_checkpoint(str(tmp_path / name / "ckpt"), model, None, restore_rng=False)
        return model.state_dict()

    single = weights("single")
    for key, value in weights("pp2-tp2").items():
        torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_long_context_phase_finds_the_main_runs_checkpoint(tmp_path, monkeypatch):
    """`checkpoint.load: null` with finetune: the newest job under runs/pretrain/ that trained
    from scratch and has a complete checkpoint; none: one error line naming the key."""
    from nemotron.cli.pretrain import _finetune_source, main_run_checkpoint
    from nemotron.config import ConfigError
    from nemotron.train.config import CheckpointConfig

    monkeypatch.chdir(tmp_path)
    lc = CheckpointConfig(load=None, finetune=True, save=str(tmp_path / "lc"))
    with pytest.raises(ConfigError, match=r"^checkpoint.load: null, and no main pretraining run"):
        _finetune_source(lc, lc.save, dry_run=False)
    assert _finetune_source(lc, lc.save, dry_run=True) is None

    def job(name: str, finetune: bool, complete: bool) -> Path:
        d = tmp_path / "runs" / "pretrain" / name
        save = d / "checkpoints"
        (save / "iter_0000004").mkdir(parents=True)
        if complete:  # complete = its manifest (written last) exists
            from nemotron.train.checkpoint import MANIFEST_FILE

            (save / "iter_0000004" / MANIFEST_FILE).write_text("{}")
        (d / "config.yaml").write_text(f"checkpoint:\n  save: {save}\n  finetune: {str(finetune).lower()}\n")
        return save / "iter_0000004"

    main = job("20260101-000000-aaaaaa", finetune=False, complete=True)
    job("20260102-000000-bbbbbb", finetune=True, complete=True)  # an earlier LC run: skipped
    job("20260103-000000-cccccc", finetune=False, complete=False)  # no complete checkpoint yet
    assert main_run_checkpoint().resolve() == main.resolve()
    assert Path(_finetune_source(lc, lc.save, dry_run=False)).resolve() == main.resolve()
    # an explicit checkpoint.load wins
    chosen = dataclasses.replace(lc, load=str(tmp_path / "elsewhere"))
    assert _finetune_source(chosen, lc.save, dry_run=False) == str(tmp_path / "elsewhere")


def test_mock_data_mixes_lengths_too(tmp_path):
    cfg = make_config(tmp_path, train={"micro_batch_size": 1, "global_batch_size": 4})
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            mock=True,
            blend_weight=1.0,
            mixed_length_blends=[SequenceLengthBlend(blend="", seq_length=4, weight=3.0)],
        ),
    )
    data = TrainingData(cfg.data, cfg.train, plan_batches(cfg.train, 1, cfg.data), 64)
    assert sorted(b["tokens"].shape[1] for b in data.next_train_batches()) == [4, 4, 4, 16]
    assert data.last_step_tokens == 28


def test_mixed_length_config_errors_name_the_key():
    from nemotron.config import PretrainConfig, load_config, resolve_config_path
    from nemotron.config.errors import ConfigError

    path = resolve_config_path("long_context_tiny", PretrainConfig)
    with pytest.raises(
        ConfigError,
        match=r"data.mixed_length_blends\[0\].seq_length: must be "
        r"positive, got 0",
    ):
        load_config(path, ["data.mixed_length_blends=[{blend: b.json, seq_length: 0}]"], PretrainConfig)
    with pytest.raises(ConfigError, match=r"data.mixed_length_blends\[0\].weight: must be >= 0"):
        load_config(path, ["data.mixed_length_blends=[{blend: b.json, weight: -1}]"], PretrainConfig)


@pytest.mark.slow  # torchrun with several ranks: ~23 s
def test_long_context_recipe_under_torchrun_shares_one_default_job_dir(tmp_path):
    """`torchrun --nproc-per-node 2 ... pretrain -c long_context_tiny` without --job-dir: rank 0
    names the default job dir and every rank uses it (the checkpoint save checks that the
    ranks agree); a job dir rank 0 cannot create stops every rank at once with its reason."""
    args = [
        "-c",
        "long_context_tiny",
        *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
        "train.train_iters=1",
        "train.seq_length=16",
        "train.eval_iters=0",
        "train.activation_recompute=false",
        "checkpoint.save_interval=1",
        "checkpoint.finetune=false",
        "data.mock=true",
        "data.mixed_length_blends=[]",
        "logger.progress_bar=false",
    ]
    run = _cli(args, tmp_path, 2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (job,) = (tmp_path / "runs" / "pretrain").iterdir()  # one complete directory, no leftovers
    assert f"job dir {job}" in " ".join(run.stdout.split())
    assert json.loads((job / "result.json").read_text())["status"] == "completed"
    shards = sorted(p.name for p in (job / "checkpoints" / "iter_0000001").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards
    # a launch never writes into another's directory: the name is new per launch (time and a
    # random suffix, tests/artifacts/test_jobdir.py), and an existing one is refused by all
    run = _cli(args + ["--job-dir", str(job)], tmp_path, 2)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("already exists" in line for line in errors), run.stderr[-3000:]
    assert [p.name for p in job.parent.iterdir()] == [job.name]
