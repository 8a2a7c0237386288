"""The `nemotron` CLI up to the library calls: dry runs, job dirs, one-line errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import typer

import nemotron
import nemotron.train
from nemotron.cli.main import register_commands
from nemotron.config import DataPrepJobConfig, PretrainConfig, load_config, recipe_config_dir
from nemotron.data.indexed import IndexedDatasetWriter


@dataclasses.dataclass
class FakeSummary:
    steps: int
    tokens: int
    final_loss: float
    checkpoint: str


def readable_blend(tmp_path: Path) -> Path:
    """A blend file `pretrain` reads before making a job dir (one tiny prefix as the train
    split), for tests whose training is a stand-in."""
    with IndexedDatasetWriter(tmp_path / "shard", np.uint16) as writer:
        writer.add_document(np.arange(40, dtype=np.uint16))
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": ["1", str(tmp_path / "shard")]}))
    return blend


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------- help, registration


def test_help_lists_stages(cli):
    result = cli("nano3", "--help")
    assert result.exit_code == 0
    assert "pretrain" in result.output and "data" in result.output
    result = cli("nano3", "data", "prep", "pretrain", "--help")
    assert result.exit_code == 0 and "--sample" in result.output and "--force" in result.output
    assert cli("--version").output.strip() == f"nemotron {nemotron.__version__}"


def test_register_commands_skips_modules_not_installed():
    target = typer.Typer()
    done = register_commands(target, ("nemotron.cli.pretrain", "nemotron.cli.not_a_module_yet"))
    assert done == ["nemotron.cli.pretrain"]
    assert [c.name for c in target.registered_commands] == ["pretrain"]


# ---------------------------------------------------------------- dry run


def test_pretrain_dry_run_prints_config_and_plan_and_writes_nothing(cli, tmp_path):
    result = cli("nano3", "pretrain", "-c", "tiny", "--dry-run", "train.train_iters=3", "optimizer.lr=5e-4")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "train_iters: 3" in out and "lr: 0.0005" in out
    assert "hybrid_pattern: MEM*EM" in out
    assert "; 1 rank (GPUs) per model replica" in out  # not "1 ranks"
    for label in ("stage", "where", "command", "checkpoints", "job dir", "data"):
        assert re.search(rf"^{label}\s", out, re.M), label
    assert "train.train_iters=3" in out  # the command line that reproduces the run
    assert all_files(cli.work) == [] and not (tmp_path / "cache").exists()


def test_dry_run_with_a_manual_pipeline_split_prints_it(cli):
    # the recipe's `model` section carries the split as a list: validation's memoised split
    # once hashed it ("error: TypeError: unhashable type: 'list'")
    result = cli(
        "nano3",
        "pretrain",
        "-c",
        "long_context",
        "--dry-run",
        "model.pipeline_blocks_per_stage=[10,14,14,14]",
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "stage 0 (PP rank 0): blocks 0-9 " in out and "stage 3 (PP rank 3): blocks 38-51 " in out


def test_long_context_dry_run_shows_the_spec_layout(cli):
    result = cli("nano3", "pretrain", "-c", "long_context", "--dry-run")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # the plan table may wrap long rows
    assert "TP8 PP4 EP8 CP8 SP on" in out and "pipeline: 1F1B, 4 stages" in out
    assert "not supported" not in out and "does not compose" not in out  # PP runs with TP
    assert "predicted 256 GPUs, DP1 TP8 EP8 CP8 PP4" in out  # one replica: the layout's world size
    # every stage's blocks and share of the FLOPs; the LM head on the last stage
    assert "stage 0 (PP rank 0): blocks 0-11 'MEMEM*EMEMEM' + embeddings:" in out
    assert re.search(r"stage 3 \(PP rank 3\): blocks \d+-51 '\S+' \+ LM head \+ loss", out)
    assert "none found under runs/pretrain; set checkpoint.load" in out
    assert "48 x 524288 tokens (micro-batch 1) mixed with 4096-token samples" in out
    assert "121,000,000,000 tokens (~9,542 steps)" in out
    assert "weights only of" in out and "style: constant" in out and "lr: 1.0e-05" in out
    assert "activation_recompute: true" in out
    assert all_files(cli.work) == []


def test_data_prep_dry_run_writes_nothing(cli, tmp_path):
    result = cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "-d", "--sample", "7", "num_shards=3")
    assert result.exit_code == 0, result.output
    assert "sample: 7" in result.output and "num_shards: 3" in result.output
    assert "embedded://stdlib-code" in result.output
    assert all_files(cli.work) == [] and not (tmp_path / "cache").exists()


def test_dry_run_with_local_profile_renders_and_writes_nothing(cli):
    (cli.work / "env.toml").write_text('[here]\nexecutor = "local"\nnproc_per_node = 2\n')
    result = cli("nano3", "pretrain", "-c", "tiny", "-d", "--run", "here", "train.micro_batch_size=8")
    assert result.exit_code == 0, result.output
    assert "torchrun" in result.output and "--nproc-per-node 2" in result.output
    assert all_files(cli.work) == [cli.work / "env.toml"]


def test_dry_run_says_what_data_split_does_with_the_blend(cli, tmp_path):
    """data.split cuts a blend file of one blend for every split: the plan names the split
    string the run uses (Megatron's default where none is set) and says when the file gives
    each split its own blend, which the run refuses with a split string."""
    single, per_split = tmp_path / "one.json", tmp_path / "blend.json"
    single.write_text(json.dumps(["1", "/p/a", "1", "/p/b"]))
    per_split.write_text(json.dumps({"train": ["1", "/p/a"]}))

    def data_row(*overrides: str) -> str:
        result = cli("nano3", "pretrain", "-c", "tiny", "-d", *overrides)
        assert result.exit_code == 0, result.output
        out = " ".join(result.output.split())
        row = out[out.index(" data ") : out.index(" phase 2 ")]
        return row.split(" warning ")[0]  # "98,2" leaves no test split: a warning row follows

    assert "split '969, 30, 1' (Megatron's default" in data_row(f"data.blend={single}")
    assert data_row(f"data.blend={single}", "data.split=98,2").endswith("one.json, split '98,2'")
    row = data_row(f"data.blend={per_split}", "data.split=98,2")
    assert row.endswith("blend.json, split '98,2'")
    assert "split" not in data_row(f"data.blend={per_split}")
    # the refusal is a warning row of the plan, in the run's words (`_blend_file_problems`)
    result = cli("nano3", "pretrain", "-c", "tiny", "-d", f"data.blend={per_split}", "data.split=98,2")
    out = " ".join(result.output.split())
    assert f"warning the run refuses data.blend: blend file {per_split} gives each split its own blend" in out
    assert "leave data.split unset" in out


def test_dry_run_names_each_blend_file_the_run_refuses(cli, tmp_path):
    """The dry run printed a plan (exit 0) for a blend file the run refuses before its job dir:
    not JSON of a blend, or per-split under data.split, as data.blend, data.phase2_blend or a
    mixed-length blend. Now a warning row names each key, in the run's own words."""
    single, per_split, broken = tmp_path / "one.json", tmp_path / "per.json", tmp_path / "bad.json"
    with IndexedDatasetWriter(tmp_path / "a", np.uint16) as writer:  # a blend the run reads
        writer.add_document(np.arange(40, dtype=np.uint16))
    single.write_text(json.dumps(["1", str(tmp_path / "a")]))
    per_split.write_text(json.dumps({"train": ["1", "/p/a"]}))
    broken.write_text("not json")
    result = cli(
        "nano3",
        "pretrain",
        "-c",
        "tiny",
        "-d",
        f"data.blend={broken}",
        f"data.phase2_blend={per_split}",
        "data.split=99,1,0",
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"warning the run refuses data.blend: {broken}: invalid JSON at line 1" in out
    assert f"warning the run refuses data.phase2_blend: blend file {per_split} gives each split" in out
    result = cli("nano3", "pretrain", "-c", "tiny", "-d", f"data.blend={single}", "data.split=99,1,0")
    assert result.exit_code == 0 and "refuses" not in result.output


def test_dry_run_warns_when_eval_iters_asks_for_a_split_the_blend_lacks(cli, tmp_path):
    """data.split "100,0,0" with train.eval_iters > 0: nothing would be evaluated; the plan
    says so naming both keys (the run start says the same: `evaluation_warnings`)."""
    with IndexedDatasetWriter(tmp_path / "p", np.uint16) as writer:
        writer.add_document(np.arange(40, dtype=np.uint16))
    single = tmp_path / "one.json"
    single.write_text(json.dumps([str(tmp_path / "p")]))
    result = cli("nano3", "pretrain", "-c", "tiny", "-d", f"data.blend={single}", "data.split=100,0,0")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert (
        f"warning data.split '100,0,0' gives data.blend {single} no valid share: with train.eval_iters="
        in out
    )
    assert "no test share" in out and "train.eval_interval=" in out
    result = cli(
        "nano3",
        "pretrain",
        "-c",
        "tiny",
        "-d",
        f"data.blend={single}",
        "data.split=100,0,0",
        "train.eval_iters=0",
    )
    assert result.exit_code == 0 and "no valid share" not in result.output


def test_dry_run_says_when_the_phase2_blend_is_missing(cli, tmp_path):
    """The default recipe switches to a phase-2 blend at 94%: a plan that reads one that does
    not exist yet says so (it may still be prepared while phase 1 trains)."""
    result = cli("nano3", "pretrain", "-d", f"data.phase2_blend={tmp_path / 'p2' / 'blend.json'}")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    # The exact switch step: ceil(0.94 x 993,411).
    assert re.search(
        r"phase 2 \S*p2/blend.json from 94% of tokens \(step 933,807 of 993,411\) \(missing: "
        r"prepare it before the phase-2 switch",
        out,
    ), out
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "blend.json").write_text("{}")
    result = cli("nano3", "pretrain", "-d", f"data.phase2_blend={tmp_path / 'p2' / 'blend.json'}")
    out = " ".join(result.output.split())
    assert "from 94% of tokens" in out and "missing: prepare" not in out
    result = cli("nano3", "pretrain", "-d", "train.train_tokens=null", "train.train_iters=10")
    assert "from 94% of tokens (never reached" in " ".join(result.output.split())
    result = cli("nano3", "pretrain", "-c", "tiny", "-d")
    assert re.search(r"^phase 2\s+none", result.output, re.M)


def test_data_prep_help_shows_data_prep_keys(cli):
    result = cli("nano3", "data", "prep", "pretrain", "-h")
    out = " ".join(result.output.split())
    assert result.exit_code == 0 and "num_shards=8" in out
    assert "train.train_iters" not in out and "model.num_experts" not in out


# ---------------------------------------------------------------- real runs (library mocked)


def test_pretrain_job_dir_provenance(cli, tmp_path, monkeypatch):
    blend = readable_blend(tmp_path)
    calls = []

    def fake_pretrain(cfg, job_dir, **kwargs):
        calls.append((cfg, job_dir))
        assert (job_dir / "config.yaml").is_file() and (job_dir / "job.json").is_file()
        return FakeSummary(steps=3, tokens=6144, final_loss=2.5, checkpoint=f"{job_dir}/checkpoints/step_3")

    monkeypatch.setattr(nemotron.train, "pretrain", fake_pretrain, raising=False)
    job_dir = tmp_path / "jobs" / "one"
    overrides = ["train.train_iters=3", f"data.blend={blend}"]
    before = dt.datetime.now(dt.timezone.utc)
    result = cli("nano3", "pretrain", "-c", "tiny", "--job-dir", str(job_dir), *overrides)
    assert result.exit_code == 0, result.output

    ((cfg, passed_dir),) = calls
    assert passed_dir == job_dir
    assert isinstance(cfg, PretrainConfig) and cfg.train.train_iters == 3
    assert cfg.checkpoint.save == str(job_dir / "checkpoints")  # null = <job dir>/checkpoints
    assert load_config(job_dir / "config.yaml", [], PretrainConfig) == cfg

    job = json.loads((job_dir / "job.json").read_text())
    assert job["stage"] == "pretrain"
    assert job["overrides"] == overrides
    assert job["argv"] and isinstance(job["argv"], list)
    assert job["config_source"].endswith("tiny.yaml")
    assert job["package_version"] == nemotron.__version__
    assert job["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", job["git_commit"])
    assert before <= dt.datetime.fromisoformat(job["start_time"]) <= dt.datetime.now(dt.timezone.utc)

    done = json.loads((job_dir / "result.json").read_text())
    assert done["status"] == "completed" and done["steps"] == 3 and done["final_loss"] == 2.5
    out = result.output
    assert re.search(r"steps\s+3", out) and re.search(r"tokens\s+6,144", out)
    assert re.search(r"final LM loss \(last step\)\s+2\.5000", out) and "checkpoints/step_3" in out
    assert not [p for p in job_dir.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_pretrain_default_job_dir_under_runs(cli, tmp_path, monkeypatch):
    blend = readable_blend(tmp_path)
    seen = []
    monkeypatch.setattr(
        nemotron.train, "pretrain", lambda cfg, job_dir, **kwargs: seen.append(job_dir), raising=False
    )
    result = cli("nano3", "pretrain", "-c", "tiny", f"data.blend={blend}")
    assert result.exit_code == 0, result.output
    (job_dir,) = seen
    assert job_dir.parent == cli.work / "runs" / "pretrain"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", job_dir.name)


def test_pretrain_failure_is_recorded_and_one_line(cli, tmp_path, monkeypatch):
    blend = readable_blend(tmp_path)

    def boom(cfg, job_dir, **kwargs):
        raise RuntimeError("loss is nan at step 4")

    monkeypatch.setattr(nemotron.train, "pretrain", boom, raising=False)
    job_dir = tmp_path / "job"
    result = cli("nano3", "pretrain", "-c", "tiny", "--job-dir", str(job_dir), f"data.blend={blend}")
    assert result.exit_code == 1
    assert_one_line_error(result, "RuntimeError: loss is nan at step 4", "error.txt")
    assert json.loads((job_dir / "result.json").read_text())["status"] == "failed"
    assert "Traceback" in (job_dir / "error.txt").read_text()


def test_failure_on_a_full_disk_records_the_status_and_no_half_traceback(tmp_path, monkeypatch):
    """The disk is full when a failure is recorded: error.txt (the long traceback) was written
    in place first, so it stayed half-written, and its error skipped result.json, leaving a
    job dir that looked still running. Now result.json comes first and error.txt is written
    whole or not at all."""
    import errno

    from nemotron.cli.common import record_failure

    def disk_fills(self, data, *args, **kwargs):  # a short record fits, a traceback does not
        data = data.encode() if isinstance(data, str) else data
        with open(self, "wb") as f:
            f.write(data[:512])
        if len(data) > 512:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return len(data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills)
    monkeypatch.setattr(Path, "write_text", disk_fills)
    job_dir = tmp_path / "job"
    job_dir.mkdir()

    def deep(n: int) -> None:  # a traceback of many frames, a one-line message
        if n == 0:
            raise RuntimeError("loss is nan at step 4")
        deep(n - 1)

    with pytest.raises(RuntimeError) as failure:
        deep(20)
    record_failure(job_dir, failure.value)
    monkeypatch.undo()
    assert json.loads((job_dir / "result.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in job_dir.iterdir()) == ["result.json"]  # no torn error.txt, no temp


def test_a_job_dir_with_brackets_is_printed_as_it_is(cli, tmp_path, monkeypatch):
    """The job dir line is the path a user copies: "[exp]" in it was read as Rich markup and
    printed "/jobs//one" (`cli.progress.say` fixed the run's own lines, not this one)."""
    blend = readable_blend(tmp_path)
    job_dir = tmp_path / "jobs" / "[exp]" / "one"

    def fake_pretrain(cfg, job_dir, **kwargs):
        return FakeSummary(steps=3, tokens=6144, final_loss=2.5, checkpoint=f"{job_dir}/checkpoints/step_3")

    monkeypatch.setattr(nemotron.train, "pretrain", fake_pretrain, raising=False)
    result = cli("nano3", "pretrain", "-c", "tiny", "--job-dir", str(job_dir), f"data.blend={blend}")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "//" not in result.output
    assert lines.count(f"job dir {job_dir}") == 2  # when made, and in the summary
    assert f"checkpoint {job_dir}/checkpoints/step_3" in lines
    # the dry run's config rule names the config file: a recipe under such a directory too
    recipe = tmp_path / "[exp]" / "tiny.yaml"
    recipe.parent.mkdir()
    recipe.write_text((recipe_config_dir(PretrainConfig) / "tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # a short title: the rule is cut at the console's width
    result = cli("nano3", "pretrain", "-c", "[exp]/tiny.yaml", "-d", f"data.blend={blend}")
    assert result.exit_code == 0, result.output
    assert "resolved config ([exp]/tiny.yaml)" in result.output and "//" not in result.output


def test_pretrain_ctrl_c_is_one_line_that_says_how_to_resume(cli, tmp_path, monkeypatch):
    blend = readable_blend(tmp_path)

    def ctrl_c(cfg, job_dir, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nemotron.train, "pretrain", ctrl_c, raising=False)
    job_dir = tmp_path / "job"
    result = cli("nano3", "pretrain", "-c", "tiny", "--job-dir", str(job_dir), f"data.blend={blend}")
    assert result.exit_code == 130
    assert_one_line_error(
        result, f"interrupted; job dir {job_dir}", f"-c {job_dir / 'config.yaml'} reruns it"
    )
    assert json.loads((job_dir / "result.json").read_text())["status"] == "interrupted"


def test_pretrain_missing_blend_is_one_line(cli, monkeypatch):
    monkeypatch.setattr(nemotron.train, "pretrain", lambda *a: pytest.fail("must not run"), raising=False)
    result = cli("nano3", "pretrain", "-c", "tiny")
    assert_one_line_error(result, "data.blend", "data prep")
    assert all_files(cli.work) == []


@pytest.mark.parametrize(
    ("load", "why"),
    [("missing", "does not exist"), ("a_file", "is not a directory"), ("empty_dir", "holds no checkpoint")],
)
def test_pretrain_checkpoint_load_without_a_checkpoint_is_one_line_before_a_job_dir(
    cli, tmp_path, monkeypatch, load, why
):
    """A mistyped `checkpoint.load` is refused naming the key, and no (failed) job dir is left."""
    blend = readable_blend(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    monkeypatch.setattr(
        nemotron.train, "pretrain", lambda *a, **k: pytest.fail("must not run"), raising=False
    )
    path = tmp_path / load
    result = cli("nano3", "pretrain", "-c", "tiny", f"data.blend={blend}", f"checkpoint.load={path}")
    assert_one_line_error(result, "checkpoint.load: ", str(path), why)
    assert result.exit_code == 1 and all_files(cli.work) == []


def test_existing_job_dir_is_refused(cli, tmp_path, monkeypatch):
    blend = readable_blend(tmp_path)
    monkeypatch.setattr(nemotron.train, "pretrain", lambda *a: pytest.fail("must not run"), raising=False)
    job_dir = tmp_path / "taken"
    job_dir.mkdir()
    result = cli("nano3", "pretrain", "-c", "tiny", "--job-dir", str(job_dir), f"data.blend={blend}")
    assert_one_line_error(result, "already exists")


def test_data_prep_materializes_embedded_and_records_job(cli, tmp_path, fake_module):
    calls = []

    @dataclasses.dataclass
    class FakeResult:
        output_dir: str
        documents: int

    def run_data_prep(cfg, recipe_dir, progress=None, task=None, job_dir=None):
        calls.append((cfg, Path(recipe_dir)))
        return FakeResult(output_dir=cfg.output_dir, documents=12)

    fake_module("nemotron.data.prep", run_data_prep=run_data_prep)
    job_dir = tmp_path / "prep-job"
    result = cli(
        "nano3",
        "data",
        "prep",
        "pretrain",
        "-c",
        "tiny",
        "--sample",
        "5",
        "--force",
        "--job-dir",
        str(job_dir),
        "num_shards=3",
    )
    assert result.exit_code == 0, result.output
    ((cfg, recipe_dir),) = calls
    assert isinstance(cfg, DataPrepJobConfig)
    assert cfg.sample == 5 and cfg.force is True and cfg.num_shards == 3
    assert recipe_dir.name == "data_prep" and (recipe_dir / "tiny.yaml").is_file()
    # A sample run gets its own output_dir: it never replaces the full build.
    assert cfg.output_dir == str(cli.work / "output/nano3/stage0_pretrain_tiny-sample5")
    # embedded:// names became local files: the tokenizer and a rewritten blend in the job dir
    assert Path(cfg.tokenizer.model).name == "tokenizer.json" and Path(cfg.tokenizer.model).is_file()
    blend = json.loads(Path(cfg.blend_path).read_text())
    assert Path(cfg.blend_path).parent == job_dir
    assert all(Path(d["path"]).is_file() and d["path"].endswith(".jsonl") for d in blend["datasets"])
    job = json.loads((job_dir / "job.json").read_text())
    assert job["stage"] == "data_prep" and job["overrides"] == ["num_shards=3", "sample=5", "force=true"]
    assert json.loads((job_dir / "result.json").read_text())["documents"] == 12
    assert re.search(r"documents\s+12", result.output)


# ---------------------------------------------------------------- bad input: one line, non-zero


def test_missing_config_file(cli):
    assert_one_line_error(cli("nano3", "pretrain", "-c", "nowhere.yaml"), "nowhere.yaml", "not found")


def test_unknown_recipe_name_suggests(cli):
    assert_one_line_error(cli("nano3", "pretrain", "-c", "tinny", "-d"), "did you mean 'tiny'")


def test_malformed_yaml(cli):
    (cli.work / "bad.yaml").write_text("train:\n  train_iters: [1,\n")
    assert_one_line_error(cli("nano3", "pretrain", "-c", "bad.yaml", "-d"), "bad.yaml", "malformed YAML")


def test_unknown_override_key(cli):
    err = assert_one_line_error(cli("nano3", "pretrain", "-c", "tiny", "-d", "train.trian_iters=5"))
    assert "did you mean 'train.train_iters'" in err


def test_bad_value(cli):
    assert_one_line_error(
        cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "-d", "num_shards=zero"),
        "num_shards must be an integer",
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", "-g", "0"], "--gpus must be a GPU count >= 1, got 0"),
        (["plan", "-g", "8", "-g", "-8"], "--gpus must be a GPU count >= 1, got -8"),
        (["plan", "--top", "-1"], "--top must be >= 0"),
        (["export", "hf", "ckpt", "out", "--max-shard-gb", "nan"], "--max-shard-gb must be a positive"),
        (["export", "hf", "ckpt", "out", "--max-shard-gb", "0"], "--max-shard-gb must be a positive"),
        # OUT replaced whole with --overwrite: never the source or the run that holds it
        (["export", "hf", "run/checkpoints/iter_1", "run", "--overwrite"], "OUT run holds CKPT"),
        (["export", "hf", "run/checkpoints", "run/checkpoints", "--overwrite"], "is CKPT"),
        (["export", "hf", "run/checkpoints", "run/checkpoints/hf"], "is inside CKPT"),
        (["import", "hf", "hf", "hf", "--overwrite"], "OUT hf is DIR hf"),
        (["import", "hf", "hf", "hf/ckpt"], "is inside DIR hf"),
    ],
)
def test_bad_command_arguments_exit_2(cli, args, needle):
    """Values no run can mean (no GPUs, a negative count, a NaN or empty shard size) are an
    argument error, not an exit-0 table of notes or a ValueError from deep inside."""
    result = cli("nano3", *args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, needle)
    assert all_files(cli.work) == []


# what each command writes into OUT's config.json: an earlier output it may replace
EARLIER_OUTPUT = {"export": '{"model_type": "nemotron_h"}', "import": '{"model": {}}'}


@pytest.mark.parametrize("command", [["export", "hf", "ckpt"], ["import", "hf", "hf"]])
def test_an_out_that_holds_something_is_refused_before_the_source_is_read(cli, monkeypatch, command):
    """OUT not empty (or a file) without --overwrite: exit 2 and the way out, before the
    conversion (which reads the whole checkpoint first, minutes for a full model) starts."""
    import nemotron.models.nano3.hf as hf
    import nemotron.models.nano3.hf_export as hf_export

    monkeypatch.setattr(hf_export, "export_hf", lambda *a, **k: pytest.fail("must not read"))
    monkeypatch.setattr(hf, "load_hf", lambda *a, **k: pytest.fail("must not read"))
    (cli.work / "out").mkdir()
    (cli.work / "out" / "config.json").write_text(EARLIER_OUTPUT[command[0]])
    (cli.work / "out" / "old.txt").write_text("an earlier export")
    (cli.work / "a_file").write_text("x")
    result = cli("nano3", *command, "out")
    assert result.exit_code == 2
    assert_one_line_error(result, "OUT out: exists and is not empty: pass --overwrite to replace it")
    result = cli("nano3", *command, "a_file", "--overwrite")
    assert result.exit_code == 2
    err = assert_one_line_error(result, "OUT a_file: exists and is not a directory: write somewhere else")
    assert "--overwrite" not in err
    assert (cli.work / "out" / "old.txt").read_text() == "an earlier export"
    # a file on OUT's path: mkdir failed only after the conversion, "FileExistsError: [Errno
    # 17] File exists: 'a_file'", naming neither OUT nor what is wrong with it
    result = cli("nano3", *command, "a_file/out")
    assert result.exit_code == 2
    err = assert_one_line_error(
        result, "OUT a_file/out: a_file is a file, not a directory: write somewhere else"
    )
    assert "--overwrite" not in err


@pytest.mark.parametrize(
    "command, config, why",
    [
        (["export", "hf", "ckpt"], None, "is not an earlier export (holds no config.json)"),
        (
            ["export", "hf", "ckpt"],
            '{"model_type": "llama"}',
            "is not an earlier export (config.json's model_type is 'llama', not 'nemotron_h')",
        ),
        (
            ["export", "hf", "ckpt"],
            "[1, 2]",
            "is not an earlier export (its config.json is not a model config)",
        ),
        (["import", "hf", "hf"], None, "is not an earlier model checkpoint (holds no config.json)"),
        (
            ["import", "hf", "hf"],
            '{"model": {}, "train": {}}',
            "is not an earlier model checkpoint (its config.json is not one's)",
        ),
    ],
)
def test_overwrite_replaces_only_an_earlier_output(cli, monkeypatch, command, config, why):
    """`--overwrite` replaced OUT whole, whatever it was: a mistyped OUT (prepared data, a run,
    a home directory) was deleted for an export. It replaces only what the command writes (a
    NemotronH directory; a model-only checkpoint); anything else is refused, exit 2, untouched,
    before the source is read, with or without --overwrite."""
    import nemotron.models.nano3.hf as hf
    import nemotron.models.nano3.hf_export as hf_export

    monkeypatch.setattr(hf_export, "export_hf", lambda *a, **k: pytest.fail("must not read"))
    monkeypatch.setattr(hf, "load_hf", lambda *a, **k: pytest.fail("must not read"))
    data = cli.work / "data"
    data.mkdir()
    (data / "shard_0.bin").write_bytes(b"prepared tokens")
    if config is not None:
        (data / "config.json").write_text(config)
    before = all_files(cli.work)
    result = cli("nano3", *command, "data", "--overwrite")
    assert result.exit_code == 2, result.output
    err = assert_one_line_error(
        result, f"OUT data: {why}: not replaced; write somewhere else, or empty it first"
    )
    result = cli("nano3", *command, "data")
    assert result.exit_code == 2, result.output
    err = assert_one_line_error(
        result, f"OUT data: exists and is not empty: it {why}; write somewhere else, or empty it first"
    )
    assert "--overwrite" not in err
    assert all_files(cli.work) == before
    assert (data / "shard_0.bin").read_bytes() == b"prepared tokens"


def test_dry_run_warns_of_a_layout_no_world_size_can_run(cli):
    """One process ignores the configured layout (so the run is allowed), but a layout that no
    number of processes can run (8 experts over EP3) is said in the plan, not left silent."""
    result = cli("nano3", "pretrain", "-c", "tiny", "-d", "model.expert_model_parallel_size=3")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert "cannot run on any number of processes" in warning
    assert "model.num_experts=8 is not divisible by model.expert_model_parallel_size=3" in warning
    result = cli("nano3", "pretrain", "-c", "tiny", "-d", "model.expert_model_parallel_size=2")
    assert result.exit_code == 0 and "cannot run" not in result.output
    assert all_files(cli.work) == []


def test_a_layout_this_torchrun_launch_cannot_run_is_one_error(cli, monkeypatch):
    """Under torchrun (WORLD_SIZE 4) the layout is checked before a job dir is made: tiny's
    one micro-batch of 16 cannot split over 4 data-parallel ranks."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    err = assert_one_line_error(cli("nano3", "pretrain", "-c", "tiny", "-d"), "4 processes")
    assert "train.global_batch_size: 16 is not divisible by train.micro_batch_size * DP = 16*4" in err
    assert all_files(cli.work) == []


@pytest.mark.parametrize(
    "content, needles",
    [
        # a per-split file with a split string: the run refused it only after making a job dir
        (
            {"train": ["1", "/data/a"], "valid": [], "test": []},
            ["data.blend: blend file", "gives each split its own blend", "leave data.split unset"],
        ),
        ("not json", ["data.blend: ", "invalid JSON at line 1"]),
        # what `read_blend` refuses (the run read it only after making a job dir)
        (["1", "/data/missing"], ["data.blend: blend file", "blend[1] names '/data/missing'", "missing.bin"]),
        (["1", "/data/a", "x", "/data/b"], ["data.blend: blend file", "blend[2] weight 'x' is not a number"]),
    ],
    ids=["per_split_with_split", "malformed", "missing_prefix", "weight_not_a_number"],
)
def test_a_blend_file_the_run_cannot_read_is_refused_before_a_job_dir(cli, content, needles):
    blend = cli.work.parent / "blend.json"
    blend.write_text(content if isinstance(content, str) else json.dumps(content))
    err = assert_one_line_error(
        cli("nano3", "pretrain", "-c", "tiny", f"data.blend={blend}", "data.split=99,1,0"), *needles
    )
    assert str(blend) in err
    assert all_files(cli.work) == []


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"train": 5}, "'train' must be a non-empty list"),
        ({"valid": ["1", "/data/a"]}, "has no 'train' split"),
        # the valid split is read when the run evaluates (tiny: train.eval_iters > 0)
        ({"train": ["1", "PREFIX"], "valid": ["1", "/data/missing"]}, "valid[1] names '/data/missing'"),
    ],
    ids=["train_not_a_list", "no_train", "valid_prefix_missing"],
)
def test_a_per_split_blend_with_an_unreadable_split_is_refused_before_a_job_dir(cli, content, needle):
    """Well-formed JSON whose splits the run cannot read (an entry that is not a list, no train
    split, a prefix without its .bin/.idx): one line before a job dir, as for unreadable JSON."""
    with IndexedDatasetWriter(cli.work.parent / "p", np.uint16) as writer:
        writer.add_document(np.arange(40, dtype=np.uint16))
    blend = cli.work.parent / "blend.json"
    blend.write_text(json.dumps(content).replace("PREFIX", str(cli.work.parent / "p")))
    err = assert_one_line_error(cli("nano3", "pretrain", "-c", "tiny", f"data.blend={blend}"), needle)
    assert str(blend) in err
    assert all_files(cli.work) == []


def test_compile_with_pipeline_stages_passes_the_checks_before_a_job_dir(cli, monkeypatch):
    """`train.compile` with PP was refused (the stages were not compiled); each block is now
    compiled (`train.loop.compile_model`), so the start-of-run checks pass it: the dry run
    prints the plan and writes nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli("nano3", "pretrain", "-c", "long_context_tiny", "-d", "train.compile=true")
    assert result.exit_code == 0, result.output
    assert all_files(cli.work) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sample", "5", "sample=7"], "--sample 5 contradicts 'sample=7'"),
        (["--force", "force=false"], "--force contradicts 'force=false'"),
    ],
)
def test_data_prep_flag_contradicting_an_override_exits_2(cli, args, needle):
    """The flag used to win silently over the key=value token that said otherwise."""
    result = cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "-d", *args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, needle)
    agreeing = cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "-d", "--sample", "5", "sample=5")
    assert agreeing.exit_code == 0, agreeing.output


def test_run_and_batch_are_exclusive(cli):
    for stage in (["pretrain"], ["data", "prep", "pretrain"]):
        result = cli("nano3", *stage, "-c", "tiny", "--run", "a", "--batch", "b")
        assert result.exit_code == 2
        assert_one_line_error(result, "--run and --batch are mutually exclusive")
    assert all_files(cli.work) == []


def test_unknown_profile(cli):
    (cli.work / "env.toml").write_text('[cluster]\nexecutor = "local"\n')
    assert_one_line_error(
        cli("nano3", "pretrain", "-c", "tiny", "--run", "clustr"), "clustr", "did you mean 'cluster'"
    )
    assert_one_line_error(cli("nano3", "pretrain", "-c", "tiny", "--batch", "nope", "-d"), "nope")
    assert all_files(cli.work) == [cli.work / "env.toml"]


# ---------------------------------------------------------------- the job side of --run/--batch


def test_job_side_joins_the_submission_job_dir(cli, tmp_path, monkeypatch):
    """A submitted job runs `nemotron ... -c <job dir>/config.yaml` with $NEMOTRON_JOB_DIR set."""
    from nemotron.artifacts import jobdir
    from nemotron.config import dump_config

    blend = readable_blend(tmp_path)
    cfg = load_config("tiny", [f"data.blend={blend}"], PretrainConfig)
    job_dir = jobdir.create_job_dir(
        tmp_path / "submitted", config_yaml=dump_config(cfg), info={"stage": "pretrain", "profile": "cluster"}
    )
    seen = []
    monkeypatch.setattr(nemotron.train, "pretrain", lambda c, d, **kwargs: seen.append((c, d)), raising=False)
    monkeypatch.setenv("NEMOTRON_JOB_DIR", str(job_dir))
    result = cli("nano3", "pretrain", "-c", str(job_dir / "config.yaml"))
    assert result.exit_code == 0, result.output
    ((ran, where),) = seen
    assert where == job_dir and ran.checkpoint.save == str(job_dir / "checkpoints")
    assert jobdir.read_job(job_dir)["profile"] == "cluster"  # the submission's record is kept
    assert json.loads((job_dir / "run.json").read_text())["stage"] == "pretrain"
    assert json.loads((job_dir / "result.json").read_text())["status"] == "completed"


def test_job_dir_config_finds_the_shipped_blend(cli, tmp_path, fake_module):
    """A data-prep config copied elsewhere still resolves `data_blend_raw.json` (shipped)."""
    from nemotron.config import dump_config

    copied = tmp_path / "elsewhere" / "config.yaml"
    copied.parent.mkdir()
    dump_config(load_config("default", [], DataPrepJobConfig), copied)
    seen = []
    fake_module(
        "nemotron.data.prep",
        run_data_prep=lambda cfg, recipe_dir, progress=None, task=None, job_dir=None: seen.append(
            Path(recipe_dir)
        ),
    )
    result = cli("nano3", "data", "prep", "pretrain", "-c", str(copied), "--job-dir", str(tmp_path / "j"))
    assert result.exit_code == 0, result.output
    assert seen == [recipe_config_dir(DataPrepJobConfig)]


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "file not found"), ('{"datasets": [', "invalid JSON at line 1"), ('{"datasets": 3}', "datasets")],
)
def test_data_prep_bad_blend_is_one_line_before_a_job_dir(cli, tmp_path, fake_module, content, why):
    """A missing, truncated or malformed blend definition is refused naming `blend_path` and the
    file, with no blank line before it and no (failed) job dir left behind."""
    blend = tmp_path / "blend_raw.json"
    if content is not None:
        blend.write_text(content)
    fake_module("nemotron.data.prep", run_data_prep=lambda *a, **k: pytest.fail("must not run"))
    result = cli("nano3", "data", "prep", "pretrain", "-c", "tiny", f"blend_path={blend}")
    assert result.exit_code == 1
    assert_one_line_error(result, f"blend_path: {blend}: ", why)
    assert result.output == result.stderr and all_files(cli.work) == []


def test_data_prep_shows_progress_and_the_per_dataset_table(cli, tmp_path, fake_module):
    """The CLI passes a progress callback to the library and renders its reports, then the
    per-dataset summary (the library itself prints nothing)."""
    from nemotron.data.prep import DatasetSplitSummary, PrepProgress

    @dataclasses.dataclass
    class FakeResult:
        output_dir: str
        summary: list
        bad_records: dict
        bad_locations: dict

    def run_data_prep(cfg, recipe_dir, progress=None, task=None, job_dir=None):
        assert progress is not None
        progress(PrepProgress(phase="plan", message="planning 2 datasets"))
        progress(
            PrepProgress(
                phase="tokenize",
                units_done=1,
                units_total=2,
                documents=5,
                tokens=700,
                elapsed_s=1.0,
                message="2 of 2 work units to tokenize",
            )
        )
        progress(
            PrepProgress(
                phase="done",
                units_done=2,
                units_total=2,
                documents=9,
                tokens=1234,
                elapsed_s=2.0,
                message="data prep complete",
            )
        )
        return FakeResult(
            cfg.output_dir,
            [
                DatasetSplitSummary("wiki", "train", 6, 1000, 0.75, 2),
                DatasetSplitSummary("code", "train", 2, 200, 0.25, 1),
                DatasetSplitSummary("wiki", "valid", 1, 34, 1.0, 1),
            ],
            {"code": {"non_utf8": 3, "not_json": 0}, "wiki": {"non_utf8": 0}},
            {"code": ["/d/code.jsonl:7 (non_utf8)", "/d/code.jsonl:9 (non_utf8)"], "wiki": []},
        )

    fake_module("nemotron.data.prep", run_data_prep=run_data_prep)
    result = cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "--job-dir", str(tmp_path / "j"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "planning 2 datasets" in out and "data prep complete" in out
    assert re.search(r"train\s*│\s*wiki\s*│\s*6\s*│\s*1,000\s*│\s*75\.0%\s*│\s*2", out), out
    assert re.search(r"train\s*│\s*all\s*│\s*8\s*│\s*1,200", out)
    assert re.search(r"valid\s*│\s*all\s*│\s*1\s*│\s*34", out)
    caption = " ".join(out[out.index("bad records skipped") :].split())
    assert caption.startswith(
        "bad records skipped: code: 3 non_utf8, the first at /d/code.jsonl:7 (non_utf8)"
    )
    assert "wiki:" not in caption and "not_json" not in caption


def test_data_prep_logs_the_data_artifact_to_wandb_offline(cli, tmp_path, fake_module, monkeypatch):
    """wandb=true: the finished output is logged as DataBlendsArtifact-pretrain from the job's
    own offline W&B run, and the CLI says how to sync it."""
    pytest.importorskip("wandb")
    import numpy as np
    from artifacts.wandb_records import artifact_records

    from nemotron.data.indexed import IndexedDatasetWriter

    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    out.mkdir()
    with IndexedDatasetWriter(out / "data_00000", np.uint16) as writer:
        writer.add_document(np.arange(1, 50, dtype=np.uint16))
    (out / "blend.json").write_text(json.dumps({"train": ["1.0", str(out / "data_00000")]}))
    (out / "metadata.json").write_text(json.dumps({"fingerprint": "0123456789abcdef" * 4}))

    @dataclasses.dataclass
    class FakeResult:
        blend_path: Path
        cached: bool

    fake_module(
        "nemotron.data.prep",
        run_data_prep=lambda cfg, recipe_dir, progress=None, task=None, job_dir=None: FakeResult(
            out / "blend.json", True
        ),
    )
    config = tmp_path / "prep.yaml"
    config.write_text(f"blend_path: raw.json\noutput_dir: {out}\nwandb: true\n")
    # read before a job dir is made (the stand-in prep does not read it)
    (tmp_path / "raw.json").write_text(
        json.dumps({"datasets": [{"name": "d", "path": "org/d", "weight": 1}]})
    )
    job_dir = tmp_path / "prep-job"
    result = cli(
        "nano3",
        "data",
        "prep",
        "pretrain",
        "-c",
        str(config),
        "--job-dir",
        str(job_dir),
        "wandb_project=nemotron-test",
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = (job_dir / "wandb").glob("offline-run-*")
    assert "DataBlendsArtifact-pretrain:fp-0123456789abcdef" in result.output
    assert f"wandb sync {run_dir}" in " ".join(result.output.split())
    (record,) = artifact_records(run_dir)
    assert record.name == "DataBlendsArtifact-pretrain"
    assert {e.path for e in record.manifest.contents} == {
        "metadata.json",
        "blend.json",
        "data_00000.bin",
        "data_00000.idx",
    }
    bad = cli("nano3", "data", "prep", "pretrain", "-c", str(config), "wandb_mode=sometimes")
    assert_one_line_error(bad, "wandb_mode='sometimes'")


def test_project_errors_print_their_message_foreign_ones_their_class_too(capsys):
    """The project's exceptions are written for the user (naming the file, key or line): the
    error line is that message, no class name in front; a foreign one keeps its class."""
    import typer

    from nemotron.cli.common import user_errors
    from nemotron.data.gpt_dataset import GPTDatasetError

    with pytest.raises(typer.Exit) as exit_info:
        with user_errors():
            raise GPTDatasetError("data/train_00000.idx: 12 documents but 13 offsets")
    assert exit_info.value.exit_code == 1
    assert capsys.readouterr().err.strip() == "error: data/train_00000.idx: 12 documents but 13 offsets"
    with pytest.raises(typer.Exit):
        with user_errors():
            raise RuntimeError("CUDA error: out of memory")
    assert capsys.readouterr().err.strip() == "error: RuntimeError: CUDA error: out of memory"


def test_the_interrupted_line_says_what_resumes_the_run(tmp_path):
    # It always said "resume with checkpoint.load=<that checkpoint>": a rerun of a command
    # that names one checkpoint starts there again, so the advice is the save dir, or the
    # same command where that resumes on its own.
    from nemotron.cli.pretrain import _how_to_resume
    from nemotron.config import PretrainConfig

    ckpt = str(tmp_path / "save" / "iter_0000004")
    for load, finetune, words in (
        (None, False, f"rerun the same command to resume from {ckpt}"),
        (str(tmp_path / "save"), False, "rerun the same command"),
        (str(tmp_path / "other" / "iter_0000002"), True, "rerun the same command"),
        (str(tmp_path / "save" / "iter_0000002"), False, f"resume with checkpoint.load={tmp_path / 'save'}"),
    ):
        cfg = PretrainConfig()
        cfg.checkpoint = dataclasses.replace(
            cfg.checkpoint, save=str(tmp_path / "save"), load=load, finetune=finetune
        )
        assert _how_to_resume(cfg, ckpt) == words or _how_to_resume(cfg, ckpt).startswith(words), (
            load,
            finetune,
        )


def test_a_sigterm_arriving_while_a_failure_is_recorded_waits_for_the_record(tmp_path):
    # Under torchrun a peer's failure makes the agent SIGTERM every worker: one arriving as this
    # rank recorded its own failure killed it before result.json was written.
    import signal
    import subprocess
    import sys

    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from nemotron.cli import common
        job = Path(sys.argv[1]); job.mkdir()
        real = common.record_failure
        def record(job_dir, exc):
            os.kill(os.getpid(), signal.SIGTERM)  # the agent's, arriving now
            real(job_dir, exc)
        common.record_failure = record
        def fn():
            raise RuntimeError("rank failed")
        common.run_stage(fn, job)
        """
    )
    job = tmp_path / "job"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(job)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr  # still ended by the signal, after
    assert json.loads((job / "result.json").read_text())["status"] == "failed"
    assert "error: RuntimeError: rank failed" in proc.stderr
