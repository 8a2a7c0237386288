import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from nemotron.config.schema import ModelConfig
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.checkpoint import (
    LATEST_FILE,
    MANIFEST_FILE,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointError,
    CheckpointShapeError,
    CheckpointWriteError,
    complete_checkpoints,
    find_checkpoint,
    finish_interrupted_saves,
    load_checkpoint,
    read_latest,
    resolve_checkpoint,
)
from nemotron.train.config import OptimizerConfig
from nemotron.train.optimizer import build_optimizer

from .conftest import TINY_MODEL


def model_and_optimizer(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Nano3ForCausalLM(ModelConfig(**{**TINY_MODEL, **overrides}).arch())
    opt = build_optimizer(model, OptimizerConfig())
    loss = model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
    loss.backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_optimizer_biases_rng_and_state(tmp_path):
    model, opt = model_and_optimizer()
    model.moe_layers()[0].router.expert_bias.copy_(torch.arange(8.0) / 100)
    ckpt = Checkpointer(tmp_path / "save")
    torch.manual_seed(42)
    path = ckpt.save(5, model, opt, {"step": 5, "tokens": 80}, {"config.json": "{}"})
    expected_draw = torch.rand(3)
    assert path.name == "iter_0000005" and (tmp_path / "save" / LATEST_FILE).read_text() == "iter_0000005\n"

    other, other_opt = model_and_optimizer(seed=1)
    torch.manual_seed(0)
    loaded = load_checkpoint(tmp_path / "save", other, other_opt)  # a save dir: its latest
    assert loaded.path == path and loaded.train_state == {"step": 5, "tokens": 80}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG state restored
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(other.moe_layers()[0].router.expert_bias, torch.arange(8.0) / 100)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key])


def test_wrong_shape_names_the_mismatched_parameters(tmp_path):
    model, opt = model_and_optimizer()
    Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    wider, wider_opt = model_and_optimizer(num_experts=16)
    with pytest.raises(CheckpointShapeError) as err:
        load_checkpoint(tmp_path / "save", wider, wider_opt)
    message = str(err.value)
    assert "backbone.layers.1.mixer.router.weight" in message or "router" in message
    assert "expert_bias (checkpoint [8], model [16])" in message
    deeper, deeper_opt = model_and_optimizer(hybrid_pattern="ME*EM", num_layers=5)
    with pytest.raises(CheckpointShapeError, match=r"missing from checkpoint: backbone\.layers\.4\."):
        load_checkpoint(tmp_path / "save", deeper, deeper_opt)


def _architecture_json(**overrides) -> str:
    """A run's config.json as the trainer writes it: the flat model section, layout included."""
    return json.dumps({"model": dataclasses.asdict(ModelConfig(**{**TINY_MODEL, **overrides}))})


def _files(directory) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change,named",
    [
        # every weight keeps its shape, so the shape check alone let these load
        (
            dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16),
            "model.num_attention_heads 4 in the checkpoint, 2 in this run; model.num_key_value_heads 2 "
            "in the checkpoint, 1 in this run; model.head_dim 8 in the checkpoint, 16 in this run",
        ),
        (dict(num_experts=16), "model.num_experts 8 in the checkpoint, 16 in this run"),
        (dict(vocab_size=128), "model.vocab_size 64 in the checkpoint, 128 in this run"),
        (dict(hybrid_pattern="M*EE"), "model.hybrid_pattern 'ME*E' in the checkpoint, 'M*EE' in this run"),
        # the checkpoint has a head of its own: loading it failed in torch's set_state_dict
        (
            dict(tie_word_embeddings=True),
            "model.tie_word_embeddings False in the checkpoint, True in this run",
        ),
    ],
    ids=["heads-same-shapes", "experts", "vocab", "pattern", "tied-head"],
)
def test_a_changed_architecture_is_refused_naming_each_key_and_both_values(tmp_path, change, named):
    model, opt = model_and_optimizer()
    layout = dict(tensor_model_parallel_size=2, expert_model_parallel_size=2)  # a layout may change
    path = Checkpointer(tmp_path / "save").save(
        1, model, opt, {"step": 1}, {"config.json": _architecture_json(**layout)}
    )
    before = _files(tmp_path / "save")
    other, other_opt = model_and_optimizer(seed=1, **change)
    with pytest.raises(CheckpointShapeError) as err:
        load_checkpoint(path, other, other_opt, model_config=other.config)
    assert f"{path} was trained with another model ({path / 'config.json'}): {named}: " in str(err.value)
    with pytest.raises(CheckpointShapeError, match="model.") as err:  # weights only, the same
        load_checkpoint(path, other, None, restore_rng=False, model_config=other.config)
    assert _files(tmp_path / "save") == before


def test_architecture_keys_that_leave_the_weights_alone_load(tmp_path):
    """Initialisation, the SSD chunk and unused blocks' sizes change nothing of the weights;
    a forward-only change (top-k) loads and is reported, for the run to warn about it."""
    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(
        1, model, opt, {"step": 1}, {"config.json": _architecture_json()}
    )
    free = dict(init_std=0.2, mamba_chunk_size=8, mamba_dt_min=1e-2, ffn_hidden_size=8)  # no '-' block
    other, other_opt = model_and_optimizer(seed=1, **free)
    assert load_checkpoint(path, other, other_opt, model_config=other.config).model_changes == []
    other, other_opt = model_and_optimizer(seed=1, moe_top_k=3)
    assert load_checkpoint(path, other, other_opt, model_config=other.config).model_changes == [
        "model.moe_top_k 2 in the checkpoint, 3 in this run: the checkpoint's weights are loaded into "
        "a model that computes differently"
    ]
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_resumed_run_checks_the_architecture_before_loading(tmp_path):
    """`restore` (the trainer's resume) passes the run's architecture to the check."""
    from nemotron.train.trainer import restore

    from .conftest import make_config

    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(
        1, model, opt, {"step": 1}, {"config.json": _architecture_json()}
    )
    cfg = make_config(tmp_path, checkpoint={"load": str(path)})
    cfg.model = ModelConfig(
        **{**TINY_MODEL, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    )
    other, other_opt = model_and_optimizer(seed=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(CheckpointShapeError, match=r"model\.num_attention_heads 4 in the checkpoint, 2"):
        restore(cfg, other, other_opt)


def test_a_checkpoint_without_optimizer_state_for_a_parameter_is_named(tmp_path):
    """No config.json to compare with: torch's own refusal becomes a CheckpointShapeError."""
    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    tied, tied_opt = model_and_optimizer(seed=1, tie_word_embeddings=True)
    with pytest.raises(CheckpointShapeError, match=r"iter_0000001 does not fit this model and optimizer: "):
        load_checkpoint(path, tied, tied_opt)


def test_incomplete_saves_are_invisible_and_keep_last(tmp_path):
    model, opt = model_and_optimizer()
    ckpt = Checkpointer(tmp_path / "save", keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, {"step": step})
    assert [s for s, _ in complete_checkpoints(tmp_path / "save")] == [2, 3]
    # A half-written save (killed mid-write) and a stale marker do not fool resume.
    (tmp_path / "save" / ".tmp-iter_0000004").mkdir()
    (tmp_path / "save" / "iter_0000005").mkdir()  # no metadata: not complete
    assert resolve_checkpoint(tmp_path / "save").name == "iter_0000003"
    (tmp_path / "save" / LATEST_FILE).write_text("iter_0000009\n")
    assert resolve_checkpoint(tmp_path / "save").name == "iter_0000003"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    assert resolve_checkpoint(tmp_path / "empty", must_exist=False) is None


def test_a_prune_cut_short_leaves_no_half_checkpoint_and_is_finished_on_resume(tmp_path, monkeypatch):
    """A kill while `keep_last` deletes an old checkpoint (large: it takes a while): the
    checkpoint was deleted in place, so a part of it stayed as `iter_N`, without its manifest
    never complete again, so never pruned: its space stayed taken for good."""
    import nemotron.train.checkpoint as checkpoint_module

    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    ckpt = Checkpointer(save, keep_last=2)
    for step in (1, 2):
        ckpt.save(step, model, opt, {"step": step})
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False, **kwargs):
        if (Path(path) / MANIFEST_FILE).is_file() and not Path(path).name.startswith(".tmp-iter_"):
            (Path(path) / MANIFEST_FILE).unlink()  # the first file to go, then the kill
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(3, model, opt, {"step": 3})
    monkeypatch.undo()
    assert sorted(p.name for p in save.iterdir() if not p.name.startswith(".")) == [
        "iter_0000002",
        "iter_0000003",
        "latest",
    ]
    assert find_checkpoint(save) == (save / "iter_0000003", [])
    finish_interrupted_saves(save)  # what a resumed run does first
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]


def test_async_save_is_visible_only_after_wait(tmp_path):
    model, opt = model_and_optimizer()
    ckpt = Checkpointer(tmp_path / "save", async_save=True)
    path = ckpt.save(7, model, opt, {"step": 7})
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the save is in flight
    if ckpt.in_flight:
        assert not path.exists()
    ckpt.wait()
    assert path.exists() and json.loads((path / "train_state.json").read_text()) == {"step": 7}
    fresh, fresh_opt = model_and_optimizer(seed=3)
    load_checkpoint(path, fresh, fresh_opt)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, reference[name]), name  # the state at save time


@pytest.mark.parametrize("where", ["dcp", "manifest", "rng"])
def test_save_failing_mid_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """A save that fails after writing part of its files (here: the shards written, then a full
    disk; or the manifest write failing; or the RNG file, whose writer, torch's zip writer,
    reports a full disk as a RuntimeError "unexpected pos": that escaped as torch's own error,
    the half-written save left behind) leaves the previous checkpoint intact and `latest`, and
    nothing that looks like a checkpoint of the failed step."""
    import errno

    import nemotron.train.checkpoint as ckpt_module

    model, opt = model_and_optimizer()
    saver = Checkpointer(tmp_path / "save")
    first = saver.save(1, model, opt, {"step": 1})
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "dcp":
        real_save = ckpt_module.dcp.save

        def save_then_fail(state, checkpoint_id, **kwargs):
            real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # shards and .metadata written
            raise full

        monkeypatch.setattr(ckpt_module.dcp, "save", save_then_fail)
    elif where == "rng":

        def torch_save_on_a_full_disk(obj, path):
            Path(path).write_bytes(b"PK\x03\x04" + b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406")

        monkeypatch.setattr(ckpt_module.torch, "save", torch_save_on_a_full_disk)
    else:

        def fail_manifest(path, text, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(ckpt_module, "atomic_write_text", fail_manifest)
    with pytest.raises(CheckpointWriteError, match="checkpoint iter_0000002 could not be written") as err:
        saver.save(2, model, opt, {"step": 2})
    assert ("unexpected pos" if where == "rng" else "No space left on device") in str(err.value)
    assert "MiB were free there" in str(err.value)
    save = tmp_path / "save"
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", LATEST_FILE]  # no .tmp-* left
    assert (save / LATEST_FILE).read_text() == "iter_0000001\n"
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert find_checkpoint(save) == (first, [])


@pytest.mark.parametrize("resave", [False, True])
def test_a_save_killed_while_publishing_is_finished_not_lost(tmp_path, monkeypatch, resave):
    """Killed after its manifest (the save is complete) but before `.tmp-iter_N` became `iter_N`
    (re-saving a step: after the old `iter_N` was moved aside), the new checkpoint is published
    by `finish_interrupted_saves` (the trainer calls it before resuming), not left hidden for
    the next save of that step to delete; the set-aside copy goes."""
    import os

    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    saver = Checkpointer(save)
    saver.save(1, model, opt, {"step": 1})
    if resave:
        saver.save(2, model, opt, {"step": 2, "run": "abandoned"})
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if os.path.basename(src).startswith(".tmp-iter_"):
            raise KeyboardInterrupt  # the process dies here: no cleanup of ours runs
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        saver.save(2, model, opt, {"step": 2, "run": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    hidden = sorted(p.name for p in save.iterdir() if p.name.startswith("."))
    assert hidden == [".tmp-iter_0000002", *([".tmp-old-iter_0000002"] if resave else [])]
    assert find_checkpoint(save)[0] == save / "iter_0000001"  # what resume would take, unfinished

    assert finish_interrupted_saves(save) == ["iter_0000002"]
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "iter_0000002", LATEST_FILE]
    assert read_latest(save) == "iter_0000002"
    found, skipped = find_checkpoint(save)  # verified against its manifest
    assert (found, skipped) == (save / "iter_0000002", [])
    assert json.loads((found / "train_state.json").read_text()) == {"step": 2, "run": "new"}
    assert finish_interrupted_saves(save) == []  # nothing left to finish


@pytest.mark.parametrize("resave", [False, True])
def test_a_save_killed_at_any_move_of_its_publication_resumes_from_the_newest(tmp_path, monkeypatch, resave):
    """Killed at each move of the publication in turn (the manifest, `latest`, the renames;
    the process dies there, no cleanup of ours runs), and then also at each move of the next
    start's `finish_interrupted_saves`, the start after resumes from the new checkpoint once
    its manifest was written, else from the one before. `latest` was written after the
    rename: killed between the two, `iter_2` was complete and in place, `latest` still named
    `iter_1`, and resume (`latest`'s target first) took `iter_1`."""
    import os

    from nemotron.train import checkpoint as ckpt_module

    real_replace, real_write = os.replace, ckpt_module.atomic_write_text
    model, opt = model_and_optimizer()
    template = tmp_path / "template"
    Checkpointer(template).save(1, model, opt, {"step": 1})
    if resave:  # an abandoned run's step 2, saved again after a resume from step 1
        Checkpointer(template).save(2, model, opt, {"step": 2, "run": "abandoned"})
        (template / LATEST_FILE).write_text("iter_0000001\n")
    kill, kill_finish, finish_kills = 0, 0, 0
    while True:
        if kill_finish == 0:
            kill += 1
        save = tmp_path / f"save-{kill}-{kill_finish}"
        shutil.copytree(template, save)
        saver = Checkpointer(save)
        moves: list[str] = []
        kill_at = kill

        def move(what: str) -> None:
            moves.append(what)
            if len(moves) == kill_at:
                raise KeyboardInterrupt  # the process dies here

        def replace(src, dst):
            if Path(src).name.startswith((".tmp-", "iter_")):  # (not atomic_write_text's own)
                move(f"rename {Path(src).name}")
            return real_replace(src, dst)

        def write(path, text, **kwargs):
            move(f"write {Path(path).name}")
            return real_write(path, text, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(ckpt_module, "atomic_write_text", write)
        try:
            saver.save(2, model, opt, {"step": 2, "run": "new"})
            done = True
        except KeyboardInterrupt:
            done = False
        if kill_finish:  # the next start killed too, at its kill_finish-th move
            moves, kill_at = [], kill_finish
            try:
                finish_interrupted_saves(save)
                kill_finish = 0  # its every move was a kill point: the next kill of the save
            except KeyboardInterrupt:
                kill_finish += 1
                finish_kills += 1
        elif not done:
            kill_finish = 1
        monkeypatch.undo()
        finish_interrupted_saves(save)  # the next start
        found, skipped = find_checkpoint(save)
        assert skipped == []
        if kill == 1:  # killed writing the manifest: the save never completed
            assert found == save / "iter_0000001"
        else:
            assert found == save / "iter_0000002", moves
            assert json.loads((found / "train_state.json").read_text())["run"] == "new", moves
        assert read_latest(save) == found.name
        hidden = [p.name for p in save.iterdir() if p.name.startswith(".")]
        assert hidden == ([".tmp-iter_0000002"] if kill == 1 else []), moves  # (the next save's)
        if done:
            break
    assert kill == (5 if resave else 4)  # every move of the publication was a kill point
    assert finish_kills == (8 if resave else 4)  # and of the finishing after each


def test_a_save_whose_rename_fails_leaves_latest_as_it_was(tmp_path, monkeypatch):
    """`latest` is pointed at a checkpoint before its rename: a rename that fails (the save
    fails and is removed) puts `latest` back, bytes and all (here not UTF-8: read as absent,
    and not what stops a save)."""
    import errno
    import os

    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    saver = Checkpointer(save)
    saver.save(1, model, opt, {"step": 1})
    (save / LATEST_FILE).write_bytes(b"\xff iter_0000001")
    real_replace = os.replace

    def rename_fails(src, dst):
        if Path(src).name == ".tmp-iter_0000002":
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        saver.save(2, model, opt, {"step": 2})
    monkeypatch.undo()
    assert (save / LATEST_FILE).read_bytes() == b"\xff iter_0000001"
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", LATEST_FILE]
    saver.save(2, model, opt, {"step": 2})
    assert read_latest(save) == "iter_0000002"


def test_resaving_a_step_whose_old_copy_will_not_go_still_points_latest_at_the_new(tmp_path, monkeypatch):
    """Re-saving step 2 after resuming from step 1 (an abandoned run saved 2 and 3): the old
    copy of iter_2 was moved aside and could not be removed (a file held open on NFS): the
    save failed after the new iter_2 was in place, with `latest` still naming the abandoned
    iter_3, which the next resume took."""
    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    saver = Checkpointer(save)
    for step in (1, 2, 3):
        saver.save(step, model, opt, {"step": step, "run": "abandoned"})
    real_rmtree = shutil.rmtree

    def busy(path, ignore_errors=False, **kwargs):
        if Path(path).name.startswith(".tmp-old-"):
            if not ignore_errors:
                raise OSError(16, "Device or resource busy", str(path))
            return
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", busy)
    saver.save(2, model, opt, {"step": 2, "run": "new"})
    assert read_latest(save) == "iter_0000002"
    assert finish_interrupted_saves(save) == []  # a start while the copy still will not go
    monkeypatch.undo()
    found, _ = find_checkpoint(save)
    assert json.loads((found / "train_state.json").read_text()) == {"step": 2, "run": "new"}
    assert finish_interrupted_saves(save) == []
    assert ".tmp-old-iter_0000002" not in [p.name for p in save.iterdir()]


def test_a_resave_killed_before_the_old_copy_moved_aside_is_finished_not_lost(tmp_path, monkeypatch):
    """Re-saving step 2, killed after the manifest but before the old iter_2 was moved aside:
    the complete new save stayed hidden (the old iter_2 was there), resume took the old iter_2
    and the next save of the step deleted the new one."""
    import os

    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    saver = Checkpointer(save)
    saver.save(1, model, opt, {"step": 1})
    saver.save(2, model, opt, {"step": 2, "run": "abandoned"})
    real_replace = os.replace

    def killed_at_the_move_aside(src, dst):
        if os.path.basename(src) == "iter_0000002":
            raise KeyboardInterrupt  # the process dies here: no cleanup of ours runs
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_move_aside)
    with pytest.raises(KeyboardInterrupt):
        saver.save(2, model, opt, {"step": 2, "run": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert finish_interrupted_saves(save) == ["iter_0000002"]
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "iter_0000002", LATEST_FILE]
    found, skipped = find_checkpoint(save)
    assert (found, skipped) == (save / "iter_0000002", [])
    assert json.loads((found / "train_state.json").read_text()) == {"step": 2, "run": "new"}


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """A run resumed from an older checkpoint of a save dir that holds later ones (an explicit
    `checkpoint.load`, or a damaged newest checkpoint skipped) saves steps below them: pruning
    counts only checkpoints up to the new one, so the new one and its predecessor stay, and
    the later ones (not this run's to judge) are left alone."""
    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    first_run = Checkpointer(save, keep_last=2)
    for step in (3, 6, 8):
        first_run.save(step, model, opt, {"step": step})
    assert [s for s, _ in complete_checkpoints(save)] == [6, 8]
    resumed = Checkpointer(save, keep_last=2)
    resumed.save(4, model, opt, {"step": 4})  # before: deleted iter 4 itself and kept 6, 8
    assert [s for s, _ in complete_checkpoints(save)] == [4, 6, 8]
    assert (save / LATEST_FILE).read_text() == "iter_0000004\n"
    resumed.save(5, model, opt, {"step": 5})
    assert [s for s, _ in complete_checkpoints(save)] == [4, 5, 6, 8]
    resumed.save(6, model, opt, {"step": 6})  # replaces the earlier run's step 6
    assert [s for s, _ in complete_checkpoints(save)] == [5, 6, 8]
    assert json.loads((save / "iter_0000006" / "train_state.json").read_text()) == {"step": 6}
    assert find_checkpoint(save)[0] == save / "iter_0000006"  # latest first


@pytest.mark.parametrize(
    "latest", [b"\xff\xfe\x00garbage", b"../../elsewhere\n", b"", b"iter_0000009\n"], ids=repr
)
def test_unreadable_or_dangling_latest_falls_back_to_the_newest_checkpoint(tmp_path, latest):
    model, opt = model_and_optimizer()
    save = tmp_path / "save"
    saver = Checkpointer(save)
    for step in (1, 2):
        saver.save(step, model, opt, {"step": step})
    (save / LATEST_FILE).write_bytes(latest)
    assert read_latest(save) is None or not (save / read_latest(save)).exists()
    assert resolve_checkpoint(save) == save / "iter_0000002"
    assert find_checkpoint(save) == (save / "iter_0000002", [])


def test_model_only_checkpoint_starts_a_run_but_is_not_resumed(tmp_path):
    """What `import hf` writes (weights + config.json + manifest, no optimizer or run state):
    verified like any checkpoint, loadable for weights (checkpoint.finetune), refused by name
    as a resume source."""
    from nemotron.models.nano3.checkpoint import save_model_checkpoint

    model, _ = model_and_optimizer()
    out = save_model_checkpoint(model, model.config, tmp_path / "imported")
    assert find_checkpoint(out) == (out, [])
    other, other_opt = model_and_optimizer(seed=1)
    with pytest.raises(
        CheckpointError, match=r"imported is a model-only checkpoint.*checkpoint\.finetune=true"
    ):
        load_checkpoint(out, other, other_opt)
    loaded = load_checkpoint(out, other, None, restore_rng=False)
    assert loaded.path == out and loaded.train_state == {}
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    # and it is verified: an altered shard is named
    shard = next(out.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"__0_0\.distcp does not match the SHA-256"):
        load_checkpoint(out, other, None, restore_rng=False)


class _RunsCode:
    """A pickle that would run code when unpickled without the weights-only unpickler."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_hostile_rng_file_is_refused_not_run(tmp_path, monkeypatch):
    import pickle

    from nemotron.train.checkpoint import describe_files, manifest_json

    monkeypatch.chdir(tmp_path)
    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    rng_file = path / "rng" / "rank_00000.pt"
    rng_file.write_bytes(pickle.dumps({"python": _RunsCode()}))
    (path / "manifest.json").write_text(manifest_json(describe_files(path), 1))  # made to match
    with pytest.raises(CheckpointCorruptError, match=r"cannot read \S+rank_00000\.pt"):
        load_checkpoint(path, model, opt)
    assert not (tmp_path / "PWNED").exists()


def test_a_train_state_without_the_loader_position_is_named(tmp_path):
    """train_state.json rewritten (with a manifest made to match) without `loader`: one
    CheckpointError naming the file, not a KeyError."""
    from nemotron.train.checkpoint import describe_files, manifest_json
    from nemotron.train.trainer import restore

    from .conftest import make_config

    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1, "tokens": 64})
    (path / "manifest.json").write_text(manifest_json(describe_files(path), 1))
    cfg = make_config(tmp_path, checkpoint={"load": str(path)})
    with pytest.raises(
        CheckpointError, match=r"iter_0000001/train_state\.json does not hold a run's state: it has no loader"
    ):
        restore(cfg, model, opt)


_DELETE = object()  # a key taken out of the saved state
_SAVED_STATE = {
    "step": 2,
    "tokens": 128,
    "skipped_steps": 0,
    "consecutive_nonfinite": 0,
    "schedule_tokens": 128,
    "loader": {
        "consumed_train_samples": 8,
        "consumed_valid_samples": 0,
        "phase": 1,
        "phase2_start_sample": None,
    },
    "schedule": {
        "style": "wsd",
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_tokens": 128,
        "stable_fraction_end": 0.5,
        "decay_style": "cosine",
        "total_tokens": 512,
    },
}


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (("loader", "consumed_train_samples"), "8", r"loader\.consumed_train_samples must be a non-negative"),
        (("loader", "consumed_train_samples"), -1, r"loader\.consumed_train_samples must be a non-negative"),
        (
            ("loader", "consumed_valid_samples"),
            10**30,
            r"loader\.consumed_valid_samples must be a non-negative",
        ),
        (("loader", "consumed_valid_samples"), 2.5, r"loader\.consumed_valid_samples must be a non-negative"),
        (
            ("loader", "consumed_valid_samples"),
            None,
            r"loader\.consumed_valid_samples must be a non-negative",
        ),
        (("loader", "phase"), 3, r"loader\.phase must be 1 or 2, got 3"),
        (("loader", "phase"), True, r"loader\.phase must be 1 or 2, got true"),
        (("loader", "phase2_start_sample"), 9, r"loader\.phase2_start_sample 9 is past"),
        (("loader", "extra"), 1, r"loader has unknown keys \['extra'\]"),
        (("loader",), [1], r"loader must be a JSON object, got \[1\]"),
        (("step",), "2", r"step must be a non-negative 64-bit integer, got \"2\""),
        (("tokens",), float("nan"), r"tokens must be a non-negative 64-bit integer, got NaN"),
        # 0 would restart the schedule's warmup, silently
        (("tokens",), _DELETE, r"it has no tokens"),
        (("loader", "consumed_train_samples"), _DELETE, r"loader has no consumed_train_samples"),
        (("skipped_steps",), True, r"skipped_steps must be a non-negative 64-bit integer, got true"),
        (("skipped_steps",), 3, r"its counters contradict each other"),
        (("schedule_tokens",), [], r"schedule_tokens must be a non-negative 64-bit integer"),
        (("schedule", "lr"), "x", r"schedule\.lr must be a finite number, got \"x\""),
        (("schedule", "min_lr"), float("inf"), r"schedule\.min_lr must be a finite number, got Infinity"),
        (("schedule", "lr"), 10**400, r"schedule\.lr must be a finite number"),
        (("schedule", "style"), 1, r"schedule\.style must be a string, got 1"),
        (("schedule", "style"), "x", r"schedule: scheduler\.style 'x' is not one of"),
        (("schedule", "total_tokens"), None, r"schedule\.total_tokens must be a non-negative 64-bit integer"),
        (
            ("schedule", "warmup_tokens"),
            10**30,
            r"schedule\.warmup_tokens must be a non-negative 64-bit integer",
        ),
        (("schedule", "stable_fraction_end"), 2.0, r"schedule: scheduler\.stable_fraction_end must be in"),
        (("schedule",), "wsd", r"schedule must be a JSON object, got \"wsd\""),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_a_train_state_with_a_value_of_the_wrong_kind_is_named(tmp_path, path, value, needle):
    """train_state.json rewritten (its manifest made to match) with a value no run writes: one
    CheckpointError naming the file and the key, not a TypeError or IndexError at the first
    use of the value, nor a run carrying it on (skipped_steps 2.5, ...)."""
    from nemotron.train.checkpoint import describe_files, manifest_json
    from nemotron.train.trainer import restore

    from .conftest import make_config

    state = json.loads(json.dumps(_SAVED_STATE))
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    model, opt = model_and_optimizer()
    saved = Checkpointer(tmp_path / "save").save(2, model, opt, state)
    (saved / "manifest.json").write_text(manifest_json(describe_files(saved), 2))
    cfg = make_config(tmp_path, checkpoint={"load": str(saved)})
    with pytest.raises(
        CheckpointError, match=r"iter_0000002/train_state\.json does not hold a run's state: " + needle
    ):
        restore(cfg, model, opt)


def test_the_saved_train_state_of_a_run_is_taken(tmp_path):
    """The counterpart of the cases above: the state a run writes is restored as it is."""
    from nemotron.train.checkpoint import describe_files, manifest_json
    from nemotron.train.trainer import restore

    from .conftest import make_config

    model, opt = model_and_optimizer()
    saved = Checkpointer(tmp_path / "save").save(2, model, opt, _SAVED_STATE)
    (saved / "manifest.json").write_text(manifest_json(describe_files(saved), 2))
    restored = restore(make_config(tmp_path, checkpoint={"load": str(saved)}), model, opt)
    assert (restored.state.step, restored.state.tokens, restored.loader.consumed_train_samples) == (2, 128, 8)
    assert restored.schedule is not None and restored.schedule.as_dict() == _SAVED_STATE["schedule"]


@pytest.mark.parametrize(
    "content", [b"\0", b"[1, 2]", b'{"model": 3}'], ids=["zeroed", "a-list", "model-not-a-table"]
)
def test_a_damaged_run_config_is_named_even_with_sizes_only_checked(tmp_path, content):
    """checkpoint.verify_checksums=false checks sizes only: config.json overwritten in place
    (same size) was read as absent, so the architecture check was skipped and the run resumed
    silently."""
    from nemotron.train.trainer import restore

    from .conftest import make_config

    model, opt = model_and_optimizer()
    cfg = make_config(tmp_path, checkpoint={"verify_checksums": False})
    saved = Checkpointer(tmp_path / "save", checksums=False).save(
        2, model, opt, _SAVED_STATE, files={"config.json": json.dumps({"model": {"num_layers": 4}})}
    )
    size = (saved / "config.json").stat().st_size
    (saved / "config.json").write_bytes(content.ljust(size, b" " if content != b"\0" else b"\0"))
    cfg.checkpoint.load = str(saved)
    with pytest.raises(CheckpointCorruptError, match=r"iter_0000002/config\.json"):
        restore(cfg, model, opt)


def test_a_file_the_manifest_does_not_list_is_damage(tmp_path):
    """A manifest cut short (an entry lost, or a file put in after the save) would leave that
    file unchecked: a flipped byte in it resumed silently."""
    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][".metadata"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointCorruptError, match=r"manifest\.json is unreadable .*does not list \.metadata"
    ):
        load_checkpoint(path, model, opt)


@pytest.mark.parametrize("kind", ["symlink-loop", "directory"])
def test_a_checkpoint_file_that_cannot_be_read_is_named(tmp_path, kind):
    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    (path / "train_state.json").unlink()
    if kind == "symlink-loop":
        (path / "train_state.json").symlink_to("train_state.json")
    else:
        (path / "train_state.json").mkdir()
    with pytest.raises(
        CheckpointCorruptError, match=r"iter_0000001/train_state\.json (cannot be read|is not a file)"
    ):
        load_checkpoint(path, model, opt)


@pytest.mark.parametrize(
    "manifest",
    [
        '{"format": 1, "files": {"train_state.json": {}}}',
        '{"format": 1, "files": {"train_state.json": 3}}',
        "[]",
        "\xff",
        '{"files": {}}',
        '{"format": 2, "files": {}}',
        '{"format": true, "files": {}}',
        "[" * 100_000 + "]" * 100_000,
        '{"format": 1, "files": {"train_state.json": {"size": 1, "sha256": null}}}',
    ],
    ids=[
        "entry-without-size",
        "entry-not-a-table",
        "not-an-object",
        "not-utf8",
        "no-format",
        "a-later-format",
        "format-true",
        "nested-too-deeply",  # before: a bare RecursionError, and no fallback on resume
        "sha256-null",  # before: "its content changed"
    ],
)
def test_a_malformed_manifest_is_named(tmp_path, manifest):
    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    (path / "manifest.json").write_bytes(manifest.encode("latin-1"))
    with pytest.raises(CheckpointCorruptError, match=r"iter_0000001/manifest\.json is unreadable"):
        load_checkpoint(path, model, opt)


def test_a_checkpoint_under_another_steps_name_is_damage_and_resume_falls_back(tmp_path):
    # iter_0000002 copied to iter_0000010: resumed "at step 2" from the newest name, the run
    # then saved its steps 4, 6, ... over the checkpoints it had already written.
    model, opt = model_and_optimizer()
    saver = Checkpointer(tmp_path / "save")
    for step in (2, 4):
        saver.save(step, model, opt, {"step": step})
    shutil.copytree(tmp_path / "save" / "iter_0000002", tmp_path / "save" / "iter_0000010")
    (tmp_path / "save" / LATEST_FILE).unlink()
    checkpoint, skipped = find_checkpoint(tmp_path / "save")
    assert checkpoint == tmp_path / "save" / "iter_0000004"
    assert [s.path.name for s in skipped] == ["iter_0000010"]
    assert "it is of step 2, but the directory is named iter_0000010" in skipped[0].problem
    with pytest.raises(CheckpointCorruptError, match=r"of step 2, but the directory is named iter_0000010"):
        load_checkpoint(tmp_path / "save" / "iter_0000010", model, opt)


@pytest.mark.parametrize(
    "train_state, words",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"step": 1' + "0" * 5000 + "}", "Exceeds the limit"),
    ],
)
def test_a_train_state_past_the_parsers_limits_is_named(tmp_path, train_state, words):
    from nemotron.train.checkpoint import describe_files, manifest_json

    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    (path / "train_state.json").write_text(train_state)
    (path / "manifest.json").write_text(manifest_json(describe_files(path), 1))  # made to match
    with pytest.raises(CheckpointError, match=rf"train_state\.json is unreadable: .*{words}"):
        load_checkpoint(path, model, opt)


def test_an_rng_file_of_another_shape_is_named(tmp_path):
    from nemotron.train.checkpoint import describe_files, manifest_json

    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    torch.save({"python": 1}, path / "rng" / "rank_00000.pt")  # before: a bare TypeError
    (path / "manifest.json").write_text(manifest_json(describe_files(path), 1))
    with pytest.raises(CheckpointCorruptError, match=r"cannot read \S+rank_00000\.pt"):
        load_checkpoint(path, model, opt)


def test_a_file_or_empty_dir_as_checkpoint_path_is_named(tmp_path):
    model, opt = model_and_optimizer()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match=r"a-file is not a directory"):
        load_checkpoint(tmp_path / "a-file", model, opt)
    with pytest.raises(CheckpointError, match=r"a-file is not a directory"):  # even for auto-resume
        load_checkpoint(tmp_path / "a-file", model, opt, must_exist=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty holds no checkpoint"):
        load_checkpoint(tmp_path / "empty", model, opt)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match=r"loop is a symlink to nothing \(dangling, or a loop\)"):
        load_checkpoint(loop, model, opt)


def test_model_only_checkpoint_on_a_full_disk_is_one_error_naming_out(tmp_path, monkeypatch):
    """DCP reports a failed write as a CheckpointException, a BaseException: `import hf` on a
    full disk ended in a traceback. Now one CheckpointWriteError naming OUT and the cause."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from nemotron.models.nano3 import checkpoint as model_checkpoint

    def disk_full(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 100)
        raise CheckpointException("write", {0: (OSError(errno.ENOSPC, "No space left on device"), "tb")})

    model, _ = model_and_optimizer()
    monkeypatch.setattr(model_checkpoint.dcp, "save", disk_full)
    with pytest.raises(
        CheckpointWriteError, match=r"imported: the checkpoint could not be written: No space"
    ):
        model_checkpoint.save_model_checkpoint(model, model.config, tmp_path / "imported")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_model_only_checkpoint_overwrite_whose_removal_of_the_old_fails_keeps_the_new(tmp_path, monkeypatch):
    """`import hf --overwrite` removed the earlier checkpoint in place before renaming the new
    one there: a removal that failed part-way lost both (half the old one, and the new one
    discarded). Now the new one is in place and intact."""
    from nemotron.models.nano3.checkpoint import save_model_checkpoint

    def remove_one_file_then_fail(path, ignore_errors=False, **kwargs):
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    first, _ = model_and_optimizer()
    out = save_model_checkpoint(first, first.config, tmp_path / "imported")
    model, _ = model_and_optimizer(seed=1)
    monkeypatch.setattr(shutil, "rmtree", remove_one_file_then_fail)
    save_model_checkpoint(model, model.config, out, overwrite=True)
    monkeypatch.undo()
    assert find_checkpoint(out) == (out, [])
    other, _ = model_and_optimizer()
    load_checkpoint(out, other, None, restore_rng=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_only_checkpoint_overwrite_replaces_only_an_earlier_one(tmp_path):
    """`overwrite` replaced any directory whole: a training checkpoint (its optimiser, loader
    and RNG state) or prepared data given as OUT by mistake was deleted for an import. Only an
    earlier model-only checkpoint is replaced now; the others are refused, untouched."""
    from nemotron.models.nano3.checkpoint import save_model_checkpoint
    from nemotron.utils.fs import NotEarlierOutput

    model, opt = model_and_optimizer()
    trained = Checkpointer(tmp_path / "save").save(
        1, model, opt, {"step": 1}, {"config.json": '{"model": {}}'}
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard_0.bin").write_bytes(b"tokens")
    for out, why in [
        (trained, "is a training checkpoint \\(holds train_state.json\\)"),
        (data, "is not an earlier model checkpoint \\(holds no config.json\\)"),
    ]:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        with pytest.raises(NotEarlierOutput, match=f"^{out}: {why}"):
            save_model_checkpoint(model, model.config, out, overwrite=True)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    out = save_model_checkpoint(model, model.config, tmp_path / "imported")
    other, _ = model_and_optimizer(seed=1)
    save_model_checkpoint(other, other.config, out, overwrite=True)
    loaded, _ = model_and_optimizer()
    load_checkpoint(out, loaded, None, restore_rng=False)
    for (name, a), (_, b) in zip(other.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_optimizer_groups_are_keyed_by_parameter_and_the_indexed_form_still_loads(tmp_path, monkeypatch):
    """Saved keyed by group index, each pipeline stage wrote "optimizer.param_groups.0.*" with
    its own parameters (tests/distributed/test_pipeline_checkpoint.py); keyed by parameter name
    now. A checkpoint of the earlier form loads as saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    import nemotron.train.checkpoint as checkpoint_module

    model, opt = model_and_optimizer()
    path = Checkpointer(tmp_path / "flat").save(1, model, opt, {"step": 1})
    keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    name = next(n for n, _ in model.named_parameters())
    assert f"optimizer.param_groups.{name}.lr" in keys
    assert not any(k.startswith("optimizer.param_groups.0.") for k in keys)

    monkeypatch.setattr(checkpoint_module, "_optimizer_options", lambda flat: StateDictOptions())
    legacy = Checkpointer(tmp_path / "indexed").save(1, model, opt, {"step": 1})
    monkeypatch.undo()
    keys = set(dcp.FileSystemReader(str(legacy)).read_metadata().state_dict_metadata)
    assert "optimizer.param_groups.0.lr" in keys
    for saved in (path, legacy):
        other, other_opt = model_and_optimizer(seed=5)
        for group in other_opt.param_groups:
            group["weight_decay"] = 0.5  # must come back from the file
        load_checkpoint(saved, other, other_opt)
        for a, b in zip(opt.param_groups, other_opt.param_groups):
            assert {k: v for k, v in a.items() if k != "params"} == {
                k: v for k, v in b.items() if k != "params"
            }
        for p, q in zip(model.parameters(), other.parameters()):
            torch.testing.assert_close(opt.state[p]["exp_avg"], other_opt.state[q]["exp_avg"], rtol=0, atol=0)
