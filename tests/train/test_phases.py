"""The phase-1 -> phase-2 switch and the evaluation splits as a run meets them: the switch step
and the samples each phase serves (computed here independently), resume on either side of the
switch, blends checked before the first step, a phase-2 blend still missing at the switch, and
the valid split of a run resumed with a longer eval_interval."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from distributed._spawn import run_distributed

from nemotron.data.gpt_dataset import GPTDatasetError, build_split_dataset
from nemotron.data.indexed import shard_seal
from nemotron.train import pretrain
from nemotron.train.data import LoaderState, PhaseSwitchError, TrainDataError, TrainingData, plan_batches
from nemotron.train.metrics import read_metrics

from .conftest import VOCAB, make_config


def expected_switch(total_steps: int, fraction: float) -> int:
    """The first step s with s / total_steps >= fraction, in exact arithmetic on the decimal
    the user wrote (the step's starting tokens reach that share of the run's tokens)."""
    return min(total_steps, math.ceil(Fraction(repr(fraction)) * total_steps))


def step_tokens(batches) -> list[torch.Tensor]:
    """The step's samples in order (one data-parallel rank: micro-batches back to back)."""
    return [row for micro in batches for row in micro["tokens"]]


@pytest.mark.parametrize(
    "length, fraction",
    [
        ({"train_iters": 20}, 0.94),
        ({"train_iters": 10}, 0.35),
        ({"train_iters": None, "train_tokens": 600}, 0.5),
    ],
)
def test_each_phase_serves_its_own_samples_from_zero_and_resumes_per_sample(
    tmp_path, corpus, length, fraction
):
    cfg = make_config(tmp_path, blend=corpus[0], phase2_blend=corpus[1], train=length)
    cfg.data = dataclasses.replace(cfg.data, phase2_start_fraction=fraction)
    plan = plan_batches(cfg.train, 1, cfg.data)
    gbs, seq = cfg.train.global_batch_size, cfg.train.seq_length
    total = length["train_iters"] or math.ceil(600 / (gbs * seq))  # tokens: ceil(600 / 64)
    assert plan.total_steps == total
    switch = expected_switch(total, fraction)
    # The two phases' datasets as Megatron would build them, each asked for its own samples.
    phase1 = build_split_dataset(corpus[0], "train", switch * gbs, seq, cfg.train.seed, tmp_path / "ref")
    phase2 = build_split_dataset(
        corpus[1], "train", (total - switch) * gbs, seq, cfg.train.seed, tmp_path / "ref"
    )
    expected = [
        [phase1[s * gbs + j]["tokens"] for j in range(gbs)]
        if s < switch
        else [phase2[(s - switch) * gbs + j]["tokens"] for j in range(gbs)]
        for s in range(total)
    ]

    data = TrainingData(cfg.data, cfg.train, plan, VOCAB)
    assert data.switch_step == switch
    states = []
    for step in range(total):
        states.append(LoaderState(**data.state_dict()))  # the state a checkpoint after `step` steps holds
        assert data.maybe_switch_phase(step) == (step == switch)
        got = step_tokens(data.next_train_batches())
        assert all(torch.equal(a, b) for a, b in zip(got, expected[step])), step
        assert data.state.phase == (1 if step < switch else 2)
    assert data.state.phase2_start_sample == switch * gbs

    # Resumed just before, at and just after the switch: the same samples, one by one.
    for resume in sorted({max(switch - 1, 0), switch, min(switch + 1, total - 1)}):
        again = TrainingData(cfg.data, cfg.train, plan, VOCAB, state=states[resume])
        for step in range(resume, total):
            again.maybe_switch_phase(step)
            got = step_tokens(again.next_train_batches())
            assert all(torch.equal(a, b) for a, b in zip(got, expected[step])), (resume, step)


def test_the_learning_rate_does_not_see_the_switch(tmp_path, corpus):
    """Tokens alone set the rate: a run with a phase-2 blend logs the rates of one without."""
    rates = {}
    for name, phase2 in (("one", None), ("two", corpus[1])):
        cfg = make_config(tmp_path / name, blend=corpus[0], phase2_blend=phase2, checkpoint={"save": None})
        cfg.train = dataclasses.replace(cfg.train, eval_iters=0)
        pretrain(cfg, tmp_path / name / "job")
        rates[name] = [r["lr"] for r in read_metrics(tmp_path / name / "job") if r["kind"] == "train"]
    assert rates["one"] == rates["two"] and len(rates["one"]) == 8


def _break(blend_path, split, value):
    blend = json.loads(blend_path.read_text())
    if value is None:
        del blend[split]
    else:
        blend[split] = value
    blend_path.write_text(json.dumps(blend))


@pytest.mark.parametrize(
    "which, split, value, message",
    [
        ("phase1", "test", ["1.0", "missing_shard"], r"test\[1\] names 'missing_shard'"),
        ("phase1", "valid", ["1.0", "missing_shard"], r"valid\[1\] names 'missing_shard'"),
        ("phase2", "train", None, r"has no 'train' split"),
        ("phase2", "train", [], r"'train' must be a non-empty list"),
        ("phase1", "train", [], r"'train' must be a non-empty list"),
    ],
)
def test_a_broken_blend_stops_the_run_before_its_first_step(tmp_path, corpus, which, split, value, message):
    """Before: a bad test split failed after the whole run, a bad valid split at the first
    evaluation, a phase-2 blend without a train split with a TypeError at the switch."""
    blends = {}
    for name, source in (("phase1", corpus[0]), ("phase2", corpus[1])):
        shutil.copytree(source.parent, tmp_path / name)
        blends[name] = tmp_path / name / "blend.json"
    _break(blends[which], split, value)
    cfg = make_config(tmp_path, blend=blends["phase1"], phase2_blend=blends["phase2"])
    events = []
    with pytest.raises(GPTDatasetError, match=message):
        pretrain(cfg, tmp_path / "job", on_event=lambda kind, payload: events.append(kind))
    assert "train" not in events


def test_a_phase2_blend_missing_at_the_switch_saves_there_and_resumes_exactly(tmp_path, corpus):
    reference = make_config(tmp_path / "ref", blend=corpus[0], phase2_blend=corpus[1])
    pretrain(reference, tmp_path / "ref" / "job")

    later = tmp_path / "phase2_later" / "blend.json"
    cfg = make_config(tmp_path, blend=corpus[0], phase2_blend=later, checkpoint={"save_interval": 100})
    warnings = []

    def record(kind, payload):
        if kind == "warning":
            warnings.append(payload["message"])

    with pytest.raises(
        PhaseSwitchError, match=r"phase 2 cannot start at step 4.*iter_0000004 \(step 4\) is saved"
    ):
        pretrain(cfg, tmp_path / "job", on_event=record)
    assert any("does not exist yet" in w and "step 4" in w for w in warnings)  # said at the start

    shutil.copytree(corpus[1].parent, later.parent)  # data prep of phase 2 finishes
    summary = pretrain(cfg, tmp_path / "job")
    assert summary.resumed_from.endswith("iter_0000004") and summary.steps == 8

    def losses(job):
        return {
            (r["kind"], r["step"]): r["loss"]
            for r in read_metrics(job)
            if r["kind"] in ("train", "eval", "test")
        }

    assert losses(tmp_path / "job") == losses(tmp_path / "ref" / "job")


def test_the_valid_split_covers_the_evaluations_of_a_run_resumed_with_a_longer_interval(tmp_path, corpus):
    """Valid holds Megatron's (train_iters // eval_interval + 1) * eval_iters * batch samples;
    a run that evaluated every step and resumes evaluating every 8 has read further than that
    (before: IndexError at its next evaluation, with a blended valid split)."""
    root = tmp_path / "blend"
    shutil.copytree(corpus[0].parent, root)
    blend = json.loads((root / "blend.json").read_text())
    blend["valid"] += ["1.0", str(root / "test")]  # two prefixes: a blend, sized exactly
    (root / "blend.json").write_text(json.dumps(blend))
    cfg = make_config(tmp_path, blend=root / "blend.json")
    gbs, iters = cfg.train.global_batch_size, cfg.train.eval_iters

    fresh = TrainingData(cfg.data, cfg.train, plan_batches(cfg.train, 1, cfg.data), VOCAB)
    assert len(fresh.eval_dataset("valid")) == (8 // 4 + 1) * iters * gbs  # Megatron's size
    first = fresh.next_valid_batches()
    assert fresh.next_valid_batches() is not None
    # The test split: its first eval_iters batches, the same ones whenever it is evaluated.
    tests = [fresh.test_batches() for _ in range(2)]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(*tests))

    # Evaluated at each of 4 steps (16 samples read); resumed with eval_interval 8.
    train = dataclasses.replace(cfg.train, eval_interval=8)
    state = LoaderState(consumed_train_samples=4 * gbs, consumed_valid_samples=4 * iters * gbs)
    resumed = TrainingData(cfg.data, train, plan_batches(train, 1, cfg.data), VOCAB, state=state)
    batches = resumed.next_valid_batches()
    assert batches is not None and resumed.state.consumed_valid_samples == 5 * iters * gbs
    assert len(resumed.eval_dataset("valid")) >= 5 * iters * gbs
    # The unchanged interval keeps Megatron's size, so the samples are the uninterrupted run's
    # (at step 3, before the first evaluation: nothing of valid read yet).
    same = TrainingData(
        cfg.data, cfg.train, fresh.plan, VOCAB, state=LoaderState(consumed_train_samples=3 * gbs)
    )
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(same.next_valid_batches(), first))


def _with_tokenizer(source, target, **tokenizer):
    """A copy of a corpus whose metadata.json records the tokenizer data prep used."""
    shutil.copytree(source.parent, target)
    meta = json.loads((target / "metadata.json").read_text())
    (target / "metadata.json").write_text(json.dumps(meta | {"tokenizer": tokenizer}))
    return target / "blend.json"


def test_blends_of_another_tokenizer_are_caught_from_their_metadata(tmp_path, corpus):
    """Token files are checked against the vocabulary only as they are read (a phase-2 blend:
    at the switch, hours in); data prep's metadata.json says at once which tokenizer wrote them."""
    phase1 = _with_tokenizer(corpus[0], tmp_path / "p1", vocab_size=VOCAB, identity="a")
    larger = _with_tokenizer(corpus[1], tmp_path / "big", vocab_size=2 * VOCAB, identity="a")
    cfg = make_config(tmp_path / "run1", blend=phase1, phase2_blend=larger)
    events = []
    with pytest.raises(
        TrainDataError, match=r"data.phase2_blend: \S*big/blend.json was tokenized with a vocabulary of 128"
    ):
        pretrain(cfg, tmp_path / "run1" / "job", on_event=lambda kind, payload: events.append(kind))
    assert "train" not in events

    other = _with_tokenizer(corpus[1], tmp_path / "other", vocab_size=VOCAB, identity="b")
    cfg = make_config(tmp_path / "run2", blend=phase1, phase2_blend=other, checkpoint={"save": None})
    cfg.train = dataclasses.replace(cfg.train, train_iters=1)
    summary = pretrain(cfg, tmp_path / "run2" / "job")
    assert any("data.phase2_blend" in w and "another tokenizer" in w for w in summary.warnings)

    # Prepared while phase 1 trained: checked at the switch, which saves and stops.
    later = tmp_path / "later" / "blend.json"
    cfg = make_config(tmp_path / "run3", blend=phase1, phase2_blend=later)
    seen = []

    def prepare_at_step_3(kind, payload):
        seen.append(kind)
        if kind == "train" and payload["step"] == 3:
            _with_tokenizer(corpus[1], later.parent, vocab_size=2 * VOCAB, identity="a")

    with pytest.raises(
        PhaseSwitchError, match=r"step 4: .*vocabulary of 128.*iter_0000004 \(step 4\) is saved"
    ):
        pretrain(cfg, tmp_path / "run3" / "job", on_event=prepare_at_step_3)


def _switch_where_ranks_see_different_files(rank, world, cfg, scenarios):
    """Per scenario, rank r reads data.phase2_blend = blends[r] (what a file system shows each
    rank in the instant data prep moves the blend in), and by the switch sees a metadata.json
    naming a vocabulary of vocab[r] (None: none); returns (open_datasets warnings, switch
    outcome, phase after) per scenario."""
    results = []
    for blends, vocab in scenarios:
        data_cfg = dataclasses.replace(cfg.data, phase2_blend=blends[rank])
        data = TrainingData(data_cfg, cfg.train, plan_batches(cfg.train, dp_size=1), VOCAB)
        warnings = data.open_datasets()
        if vocab[rank] is not None:
            meta = Path(blends[rank]).parent / "metadata.json"
            meta.write_text(json.dumps({"tokenizer": {"vocab_size": vocab[rank]}}))
        torch.distributed.barrier()
        outcome = "switched"
        try:
            data.maybe_switch_phase(data.switch_step)
        except PhaseSwitchError as e:
            outcome = str(e)
        results.append((warnings, outcome, data.state.phase))
        torch.distributed.barrier()
    return results


@pytest.mark.timeout(120)
def test_ranks_decide_together_whether_the_phase2_blend_is_there(tmp_path, corpus):
    # Each rank checked for the phase-2 blend on its own: where one saw the file and another
    # not yet, one switched to phase 2 while the other stopped to save a checkpoint, and both
    # waited on each other's collectives forever. Now they take one branch: switch only when
    # every rank sees the blend (and its tokenizer check passes on every rank).
    dirs = {}
    for name in ("seen", "seen_without_metadata", "whole"):
        dirs[name] = tmp_path / name
        shutil.copytree(corpus[1].parent, dirs[name])
    (dirs["seen_without_metadata"] / "metadata.json").unlink()
    # The copies name the same (absolute) prefixes: one index cache serves every rank.
    cfg = make_config(tmp_path, blend=corpus[0], phase2_blend=None)
    cfg.data = dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache"))
    scenarios = [
        # Rank 0 sees the blend, rank 1 not yet.
        ([str(dirs["seen"] / "blend.json"), str(tmp_path / "missing" / "blend.json")], [None, None]),
        # Both see the blend, only rank 0 the metadata.json moved in just after it, naming a
        # vocabulary larger than the model's.
        (
            [str(dirs["seen"] / "blend.json"), str(dirs["seen_without_metadata"] / "blend.json")],
            [VOCAB + 1, None],
        ),
        # Every rank sees it whole.
        ([str(dirs["whole"] / "blend.json")] * 2, [None, None]),
    ]
    ranks = run_distributed(_switch_where_ranks_see_different_files, 2, cfg, scenarios)
    missing, metadata, whole = zip(*ranks)
    for warnings, outcome, phase in missing:
        assert any("does not exist yet" in w for w in warnings)  # neither built it at the start
        assert "does not exist (on every rank)" in outcome and phase == 1
    assert "vocabulary of 65" in metadata[0][1] and "failed on another rank" in metadata[1][1]
    assert [phase for _, _, phase in metadata] == [1, 1]
    assert [(outcome, phase) for _, outcome, phase in whole] == [("switched", 2)] * 2


@pytest.mark.parametrize(
    "damage, why",
    [
        (b'{"tokenizer": {"vocab_size": 99', "is not JSON"),
        (b"[1, 2]", "is not a JSON object"),
        (b"\xff\xfe", "cannot be read"),
    ],
)
def test_a_damaged_metadata_json_is_named_not_read_as_absent(tmp_path, corpus, damage, why):
    """Read as absent, a damaged record would skip the vocabulary check without a word; a
    blend without metadata.json (hand-written) is still checked by its token files only."""
    from nemotron.train.data import check_tokenizers

    blend = _with_tokenizer(corpus[0], tmp_path / "p1", vocab_size=2 * VOCAB, identity="a")
    (blend.parent / "metadata.json").write_bytes(damage)
    with pytest.raises(TrainDataError, match=rf"{blend.parent / 'metadata.json'} .* {why}"):
        check_tokenizers([("data.blend", blend)], VOCAB)
    (blend.parent / "metadata.json").unlink()
    assert check_tokenizers([("data.blend", blend)], VOCAB) == []


@pytest.mark.parametrize(
    "saved, message",
    [
        (
            {"consumed_valid_samples": 10**15},
            r"the valid data of this run needs 10+\d* samples, from train\.eval_iters x "
            r"global_batch_size \(1 x 4\) per evaluation, one every train\.eval_interval=4 steps, "
            r"resumed at loader\.consumed_valid_samples=10+ \(/ckpt/iter_0000008/train_state\.json\): "
            r".* asked for 10+\d* samples",
        ),
        (
            # no valid position saved: valid starts where the evaluations of 10**15 steps
            # would stand (as Megatron), 10**15 x 4 samples in
            {"consumed_train_samples": 4 * 10**15},
            r"the valid data of this run needs \d+ samples.*resumed at loader\.consumed_valid_samples=",
        ),
    ],
)
def test_a_saved_position_absurd_for_the_data_is_one_error_naming_it(tmp_path, corpus, saved, message):
    """A train_state.json whose consumed counts are absurd for the run (hand-edited, its
    manifest rewritten) made the valid index be built up to them: a MemoryError. Now one
    error naming the settings and the saved key, before anything is allocated."""
    cfg = make_config(tmp_path, blend=corpus[0])
    assert cfg.train.eval_iters == 1 and cfg.train.global_batch_size == 4
    state = LoaderState(**{"consumed_train_samples": 0, **saved})
    data = TrainingData(
        cfg.data,
        cfg.train,
        plan_batches(cfg.train, 1, cfg.data),
        VOCAB,
        state=state,
        state_file="/ckpt/iter_0000008/train_state.json",
    )
    with pytest.raises(TrainDataError, match=message):
        data.open_datasets()


def _sealed(source, target):
    """A copy of a corpus whose metadata.json records each train shard's seal, as data prep's."""
    shutil.copytree(source.parent, target)
    blend = json.loads((target / "blend.json").read_text())
    prefixes = [str(target / Path(p).name) for p in blend["train"][1::2]]
    blend["train"][1::2] = prefixes
    (target / "blend.json").write_text(json.dumps(blend))
    splits = {"train": [{"prefix": p, "seal": shard_seal(p)} for p in prefixes]}
    (target / "metadata.json").write_text(json.dumps({"splits": splits}))
    return target / "blend.json", prefixes


def test_a_phase2_shard_exchanged_before_the_switch_stops_there_naming_it(tmp_path, corpus):
    """The phase-2 blend's shards are compared with data prep's seals at the start and again at
    the switch, hours later: two exchanged in between (each still a valid index of its .bin)
    stop the run there, with a checkpoint, naming the shard; left alone, the run switches."""
    blend, (first, second) = _sealed(corpus[1], tmp_path / "p2")
    cfg = make_config(tmp_path / "run", blend=corpus[0], phase2_blend=blend)

    def exchange_at_step_3(kind, payload):
        if kind == "train" and payload["step"] == 3:
            for suffix in (".bin", ".idx"):
                Path(f"{first}{suffix}").rename(tmp_path / "x")
                Path(f"{second}{suffix}").rename(f"{first}{suffix}")
                (tmp_path / "x").rename(f"{second}{suffix}")

    with pytest.raises(
        PhaseSwitchError,
        match=rf"step 4: .*{first} \(train split of {blend}\) is not the shard data prep wrote.*"
        r"iter_0000004 \(step 4\) is saved",
    ):
        pretrain(cfg, tmp_path / "run" / "job", on_event=exchange_at_step_3)

    blend, _ = _sealed(corpus[1], tmp_path / "p2b")
    cfg = make_config(tmp_path / "run2", blend=corpus[0], phase2_blend=blend, checkpoint={"save": None})
    assert pretrain(cfg, tmp_path / "run2" / "job").steps == cfg.train.train_iters
