import dataclasses
import json
import os
import signal

import pytest
import torch

from nemotron.artifacts.model import read_model_artifact
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train import NonFiniteLossError, pretrain
from nemotron.train.checkpoint import LATEST_FILE
from nemotron.train.data import TrainDataError, TrainingData, phase2_start_step, plan_batches
from nemotron.train.loop import evaluate
from nemotron.train.metrics import read_metrics

from .conftest import make_config


def losses(job_dir):
    return {(r["kind"], r["step"]): r["loss"] for r in read_metrics(job_dir) if r["kind"] != "run"}


def test_run_writes_metrics_checkpoints_and_lineage(tmp_path, corpus):
    cfg = make_config(tmp_path, blend=corpus[0], phase2_blend=corpus[1])
    events = []
    summary = pretrain(cfg, tmp_path / "job", on_event=lambda kind, p: events.append(kind))
    assert (summary.steps, summary.tokens, summary.status) == (8, 8 * 4 * 16, "completed")
    assert summary.checkpoint.endswith("iter_0000008") and summary.test_loss is not None
    assert summary.unigram_entropy > 3 and summary.balance_max_over_mean >= 1.0
    assert events[0] == "start" and events[-1] == "end" and "checkpoint" in events and "phase" in events
    # the final validation pass (then test) is announced once, after the last step
    final = events.index("final_pass")
    assert events.count("final_pass") == 1 and "train" not in events[final:]
    assert events[final + 1 : final + 3] == ["eval", "test"]

    records = read_metrics(tmp_path / "job")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in (
        "loss",
        "lm_loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "tflops",
        "mfu",
        "memory_gb",
        "balance/max_over_mean",
        "balance/bias_range",
        "phase",
    ):
        assert key in train[-1], key
    assert [r["phase"] for r in train] == [1] * 4 + [2] * 4
    assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0  # warmup from 0 in tokens
    assert {r["kind"] for r in records} == {"run", "train", "eval", "test"}
    assert records[0]["unigram_entropy"] == summary.unigram_entropy

    save = tmp_path / "ckpt"
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000003",
        "iter_0000006",
        "iter_0000008",
        LATEST_FILE,
    ]
    manifest = read_model_artifact(save / "iter_0000008")
    assert manifest["step"] == 8 and manifest["phase"] == 2
    assert manifest["data"]["content"]["kind"] == "DataBlendsArtifact-pretrain"
    assert manifest["model_config"]["num_experts"] == 8
    config = json.loads((save / "iter_0000008" / "config.json").read_text())
    assert config["model"]["hybrid_pattern"] == "ME*E"


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, corpus):
    reference = make_config(tmp_path / "ref", blend=corpus[0], phase2_blend=corpus[1])
    pretrain(reference, tmp_path / "ref" / "job")

    cfg = make_config(tmp_path, blend=corpus[0], phase2_blend=corpus[1])

    def preempt(kind, payload):
        if kind == "train" and payload["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    first = pretrain(cfg, tmp_path / "job", on_event=preempt)
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert first.status == "interrupted" and first.steps == 5
    assert first.checkpoint.endswith("iter_0000005") and "checkpoint of step 5" in first.problem
    assert (tmp_path / "ckpt" / LATEST_FILE).read_text().strip() == "iter_0000005"

    second = pretrain(cfg, tmp_path / "job")
    assert second.resumed_from.endswith("iter_0000005") and second.steps == 8
    assert losses(tmp_path / "job") == losses(tmp_path / "ref" / "job")


def test_first_ctrl_c_saves_like_sigterm_and_a_second_stops_at_once(tmp_path, corpus):
    """Ctrl-C (SIGINT): the first asks for a checkpoint after the current step, as SIGTERM
    does (the rerun resumes there); one after it raises KeyboardInterrupt at once, saving
    nothing more. The previous SIGINT handler is back either way."""
    cfg = make_config(tmp_path, blend=corpus[0])
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(times, step):
        def on_event(kind, payload):
            if kind == "train" and payload["step"] == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)

        return on_event

    first = pretrain(cfg, tmp_path / "job", on_event=interrupt(1, step=3))
    assert signal.getsignal(signal.SIGINT) is previous
    assert first.status == "interrupted" and first.steps == 3
    assert first.checkpoint.endswith("iter_0000003")
    assert (tmp_path / "ckpt" / LATEST_FILE).read_text().strip() == "iter_0000003"

    with pytest.raises(KeyboardInterrupt):  # resumed at step 3; two Ctrl-C at step 5
        pretrain(cfg, tmp_path / "job2", on_event=interrupt(2, step=5))
    assert signal.getsignal(signal.SIGINT) is previous
    # stopped at once: step 5 not checkpointed (the next save was due at step 6)
    assert (tmp_path / "ckpt" / LATEST_FILE).read_text().strip() == "iter_0000003"
    assert not (tmp_path / "ckpt" / "iter_0000005").exists()


@pytest.mark.slow  # spawns loader workers twice: ~16 s
def test_loader_workers_survive_ctrl_c(tmp_path, corpus):
    """With `data.num_workers` > 0, a Ctrl-C reaching the loader's workers (a terminal sends it
    to every process of the foreground group) leaves them running: the run trains on to its end
    with the same losses as a run without it (a worker it killed failed the next step's fetch)."""
    import multiprocessing

    cfg = make_config(tmp_path / "ref", blend=corpus[0], data={"num_workers": 1})
    pretrain(cfg, tmp_path / "ref" / "job")
    signalled = []

    def interrupt_workers(kind, payload):
        if kind == "train" and payload["step"] == 2:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGINT)
                signalled.append(child.pid)

    cfg = make_config(tmp_path, blend=corpus[0], data={"num_workers": 1})
    summary = pretrain(cfg, tmp_path / "job", on_event=interrupt_workers)
    assert signalled and summary.status == "completed" and summary.steps == 8
    assert losses(tmp_path / "job") == losses(tmp_path / "ref" / "job")


def _nan_after(monkeypatch, first_bad_step, micro_batches_per_step=2):
    """A NaN training loss at the steps in `first_bad_step` (a set) of each run; returns the
    micro-batch counter (reset it to 0 before a run that starts at step 1)."""
    calls = {"n": 0}
    original = Nano3ForCausalLM.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            step = (calls["n"] - 1) // micro_batches_per_step + 1
            if step in first_bad_step:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Nano3ForCausalLM, "forward", forward)
    return calls


def test_sigterm_at_a_skipped_step_says_no_checkpoint_was_saved(tmp_path, corpus, monkeypatch):
    """save() keeps nothing of a skipped (non-finite) step: the stop event must not claim a
    checkpoint, and names the one a rerun resumes from."""
    _nan_after(monkeypatch, {5})
    cfg = make_config(tmp_path, blend=corpus[0])
    events = []

    def preempt(kind, payload):
        events.append((kind, payload))
        if kind == "train" and payload["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = pretrain(cfg, tmp_path / "job", on_event=preempt)
    assert summary.status == "interrupted" and summary.steps == 5
    (stop,) = [payload for kind, payload in events if kind == "stop"]
    assert stop["step"] == 5 and stop["signal"] == signal.SIGTERM
    assert stop["checkpoint"] is None and stop["resume_from"].endswith("iter_0000003")
    assert (tmp_path / "ckpt" / LATEST_FILE).read_text().strip() == "iter_0000003"
    # the summary (result.json, the CLI's last line) says the same, not "after saving"
    assert "saving" not in summary.problem and "without a checkpoint of step 5" in summary.problem
    assert summary.checkpoint.endswith("iter_0000003")


def test_nonfinite_step_is_skipped_and_counted(tmp_path, corpus, monkeypatch):
    _nan_after(monkeypatch, {3})
    cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": None})
    summary = pretrain(cfg, tmp_path / "job")
    assert summary.steps == 8 and summary.skipped_steps == 1
    train = {r["step"]: r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"}
    assert train[3]["skipped"] is True and train[3]["loss"] == "nan"
    assert not train[4]["skipped"] and train[4]["skipped_steps"] == 1


def test_too_many_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    _nan_after(monkeypatch, set(range(4, 100)))
    cfg = make_config(tmp_path, blend=corpus[0], train={"max_consecutive_nonfinite": 2})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*iter_0000003"):
        pretrain(cfg, tmp_path / "job")
    save = tmp_path / "ckpt"
    assert (save / LATEST_FILE).read_text().strip() == "iter_0000003"
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000003", LATEST_FILE]


def test_eval_does_not_touch_balance_counters(tmp_path, corpus):
    cfg = make_config(tmp_path, blend=corpus[0])
    torch.manual_seed(0)
    model = Nano3ForCausalLM(cfg.model.arch())
    batch = {
        "tokens": torch.randint(0, 64, (2, 16)),
        "labels": torch.randint(0, 64, (2, 16)),
        "loss_mask": torch.ones(2, 16),
    }
    layers = model.moe_layers()
    model(batch["tokens"], labels=batch["labels"])  # a training forward counts...
    counts = [layer.router.tokens_per_expert.clone() for layer in layers]
    assert all(c.sum() > 0 for c in counts)
    biases = [layer.router.expert_bias.clone() for layer in layers]
    loss = evaluate(model, [batch, batch], device=torch.device("cpu"), precision="fp32")
    assert loss > 0 and model.training
    for layer, c, b in zip(layers, counts, biases):  # ...evaluation does not
        assert torch.equal(layer.router.tokens_per_expert, c)
        assert torch.equal(layer.router.expert_bias, b)


def test_batch_plan_from_iters_or_tokens(tmp_path):
    cfg = make_config(tmp_path)
    plan = plan_batches(dataclasses.replace(cfg.train, global_batch_size=12, micro_batch_size=2), 3)
    assert plan.grad_accumulation == 2 and plan.total_steps == 8
    by_tokens = dataclasses.replace(cfg.train, train_iters=None, train_tokens=1000)
    assert plan_batches(by_tokens).total_steps == 16  # ceil(1000 / (4 * 16))
    with pytest.raises(TrainDataError, match="divisible"):
        plan_batches(cfg.train, dp_size=3)
    # The recipe: 25T tokens, 3072 x 8192 per step, phase 2 from 94% of tokens.
    recipe = dataclasses.replace(
        cfg.train, train_iters=None, train_tokens=25 * 10**12, global_batch_size=3072, seq_length=8192
    )
    plan = plan_batches(recipe, dp_size=64)
    assert plan.total_steps == 993_411  # ceil(25e12 / 25,165,824)
    switch = phase2_start_step(
        plan, dataclasses.replace(cfg.data, phase2_blend="p2.json", phase2_start_fraction=0.94)
    )
    assert (switch - 1) * plan.tokens_per_step < 0.94 * plan.total_tokens <= switch * plan.tokens_per_step


def test_data_parallel_ranks_split_each_global_batch(tmp_path, corpus):
    cfg = make_config(tmp_path, blend=corpus[0], train={"global_batch_size": 8, "micro_batch_size": 2})
    plan = plan_batches(cfg.train, dp_size=2)
    ranks = [TrainingData(cfg.data, cfg.train, plan, 64, dp_rank=r) for r in range(2)]
    dataset = ranks[0].train_dataset(1)
    for step in range(2):
        per_rank = [d.next_train_batches() for d in ranks]
        assert all(len(b) == plan.grad_accumulation == 2 for b in per_rank)
        got = []
        for micro in range(2):
            for r in range(2):
                got.extend(per_rank[r][micro]["tokens"])
        expected = [dataset[i]["tokens"] for i in range(step * 8, step * 8 + 8)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 8
    assert ranks[0].state.consumed_train_samples == 16


def test_tensorboard_and_offline_wandb(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        checkpoint={"save": None},
        train={"train_iters": 2, "eval_iters": 0},
        logger={
            "tensorboard": True,
            "wandb": True,
            "wandb_mode": "offline",
            "wandb_project": "nemotron-test",
        },
    )
    pretrain(cfg, tmp_path / "job")
    assert list((tmp_path / "job" / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_activation_recompute_same_step_and_counts(tmp_path, corpus):
    from nemotron.train.loop import apply_activation_recompute, train_step
    from nemotron.train.optimizer import build_optimizer

    cfg = make_config(tmp_path, blend=corpus[0])
    batch = {
        "tokens": torch.randint(0, 64, (2, 16)),
        "labels": torch.randint(0, 64, (2, 16)),
        "loss_mask": torch.ones(2, 16),
    }
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = Nano3ForCausalLM(cfg.model.arch())
        if recompute:
            apply_activation_recompute(model)
        opt = build_optimizer(model, cfg.optimizer)
        step = train_step(
            model, opt, [batch, batch], device=torch.device("cpu"), precision="fp32", grad_clip=1.0
        )
        counts = [layer.router.tokens_per_expert.clone() for layer in model.moe_layers()]
        results.append((step, counts, {k: v.clone() for k, v in model.state_dict().items()}))
    (plain, plain_counts, plain_state), (recomputed, re_counts, re_state) = results
    assert recomputed.loss == pytest.approx(plain.loss, rel=1e-6)
    assert recomputed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(plain_counts, re_counts))  # no double counting
    assert plain_counts[0].sum() == 2 * 2 * 16 * 2  # 2 micro-batches x 32 tokens x top-2
    assert re_state.keys() == plain_state.keys()  # checkpoints stay layout-independent


def test_ignored_layout_names_the_sizes_one_process_cannot_apply():
    from nemotron.config.loader import load_config
    from nemotron.config.schema import PretrainConfig
    from nemotron.train.loop import ignored_layout

    assert ignored_layout(load_config("default", [], PretrainConfig)) == "TP8 EP8 SP"
    assert ignored_layout(load_config("tiny", [], PretrainConfig)) is None
    cp = load_config(
        "tiny", ["model.context_parallel_size=2", "model.sequence_parallel=true"], PretrainConfig
    )
    assert ignored_layout(cp) == "CP2"  # SP means nothing without TP


def test_same_config_and_seed_give_the_same_data_order_and_bitwise_losses(tmp_path, corpus):
    """Two runs of one config on CPU: the same samples in the same order, and every logged
    number of every step (losses, gradient norm, rate, tokens) bit for bit; a third run with
    another seed differs (so the comparison can fail)."""
    keys = ("loss", "lm_loss", "grad_norm", "lr", "tokens", "balance/max_over_mean")
    runs = []
    for name, seed in (("a", 1234), ("b", 1234), ("c", 99)):
        cfg = make_config(
            tmp_path / name,
            blend=corpus[0],
            checkpoint={"save": None},
            train={"seed": seed, "log_interval": 1, "eval_iters": 0},
        )
        plan = plan_batches(cfg.train, 1, cfg.data)
        data = TrainingData(cfg.data, cfg.train, plan, cfg.model.vocab_size, 0)
        order = [torch.cat([b["tokens"] for b in data.next_train_batches()]) for _ in range(plan.total_steps)]
        pretrain(cfg, tmp_path / name / "job")
        records = [r for r in read_metrics(tmp_path / name / "job") if r["kind"] == "train"]
        assert [r["step"] for r in records] == list(range(1, plan.total_steps + 1))
        runs.append((order, [tuple(r[k] for k in keys) for r in records]))
    (order_a, steps_a), (order_b, steps_b), (order_c, steps_c) = runs
    assert all(torch.equal(x, y) for x, y in zip(order_a, order_b))
    assert steps_a == steps_b  # floats compared exactly
    assert not all(torch.equal(x, y) for x, y in zip(order_a, order_c)) and steps_a != steps_c
