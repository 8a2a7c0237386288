"""What data prep guarantees about earlier output, through the CLI as users run it.

- A prep that fails (bad records, records without the text field, an empty input) leaves the
  previous complete output of the same `output_dir` byte for byte as it was.
- `--sample N` never replaces a full build: by default it writes to `<output_dir>-sample<N>`;
  with the same `output_dir` it is refused unless `--force`.
- A prep killed late (writing a shard, writing metadata.json, swapping the build in) is
  finished by the rerun, with no temporary file left anywhere and the bytes of a clean run.
Bad input ends with exit code 1 and one error line naming the dataset and its file, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nemotron.cli.main import app

from .conftest import make_docs, write_jsonl

PREP = ["nano3", "data", "prep", "pretrain"]


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the work directory excluded)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".work" not in path.relative_to(root).parts
    }


def _comparable(root: Path) -> dict[str, bytes]:
    """Output bytes, with the output path itself (in blend.json) and metadata.json left out."""
    return {
        str(path.relative_to(root)): path.read_bytes().replace(str(root).encode(), b"OUT")
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "metadata.json"
    }


@pytest.fixture
def project(tmp_path, bpe_dir, monkeypatch):
    """A working directory with a two-dataset blend and a data-prep recipe file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    write_jsonl(tmp_path / "web.jsonl", make_docs(200, seed=70, prefix="W "))
    write_jsonl(tmp_path / "code.jsonl", make_docs(60, seed=71, prefix="C "))
    (tmp_path / "blend.json").write_text(
        json.dumps(
            {
                "datasets": [
                    {"name": "web", "path": "web.jsonl", "weight": 2},
                    {"name": "code", "path": "code.jsonl", "weight": 1},
                ]
            }
        )
    )
    (tmp_path / "prep.yaml").write_text(
        textwrap.dedent(f"""
        blend_path: blend.json
        output_dir: {tmp_path / "out"}
        tokenizer:
          model: {bpe_dir}
        num_shards: 3
        valid_fraction: 0.05
        test_fraction: 0.05
        num_workers: 1
        work_unit_mb: 0.004
    """)
    )
    return tmp_path


def _prep(*args: str):
    return CliRunner().invoke(app, [*PREP, "-c", "prep.yaml", *args])


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _bad_records(root: Path) -> str:
    lines = [json.dumps({"text": d}) for d in make_docs(30, seed=72)]
    lines[2] = '{"text": "unterminated'
    lines[5] = "[1, 2]"
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")
    return "2 of 30 records are bad"


def _no_text_field(root: Path) -> str:
    write_jsonl(root / "web.jsonl", make_docs(30, seed=73), field="body")
    return "30 of 30 records are bad (missing_text_field 30)"


def _empty_input(root: Path) -> str:
    (root / "web.jsonl").write_text("")
    return "yielded no records"


@pytest.mark.parametrize("breakage", [_bad_records, _no_text_field, _empty_input])
def test_failed_prep_keeps_the_previous_output(project, breakage):
    first = _prep()
    assert first.exit_code == 0, first.output
    out = project / "out"
    before = _tree_hashes(out)
    assert "metadata.json" in before and "blend.json" in before
    assert any(name.startswith("train/web_") for name in before)

    expected = breakage(project)
    result = _prep()
    _assert_one_line_error(result, "dataset 'web'", "web.jsonl", expected)
    assert _tree_hashes(out) == before


def test_output_overlapping_the_input_is_refused_before_anything_is_written(project):
    blend_bytes = (project / "blend.json").read_bytes()
    # The blend definition is named blend.json and output_dir is its directory: the swap
    # replaced the user's blend definition by the per-split blend.json (the next run failed on it).
    result = _prep(f"output_dir={project}")
    _assert_one_line_error(
        result, f"the blend definition {project / 'blend.json'}", "choose another output_dir"
    )
    assert (project / "blend.json").read_bytes() == blend_bytes
    assert not (project / "metadata.json").exists() and not (project / "train").exists()
    # A directory source containing output_dir: the next run read the previous build's
    # blend.json, metadata.json and .work/*.json files as (malformed) records.
    blend = json.loads(blend_bytes)
    blend["datasets"][0]["path"] = "."
    (project / "dirsource.json").write_text(json.dumps(blend))
    result = _prep("blend_path=dirsource.json", "--job-dir", str(project.parent / f"{project.name}-jobs"))
    _assert_one_line_error(
        result, "dataset 'web'", f"output_dir {project / 'out'} is inside (or is) its source"
    )
    assert not (project / "out").exists()
    # An output_dir that is a file: was a NotADirectoryError on a path under it.
    (project / "afile").write_text("keep me\n")
    result = _prep(f"output_dir={project / 'afile'}")
    _assert_one_line_error(result, f"output_dir {project / 'afile'} is a file")
    assert (project / "afile").read_text() == "keep me\n"


def test_a_source_directory_holding_the_job_directory_is_refused(project, monkeypatch):
    # Run from inside a directory source, the default job directory (runs/ here) is part of
    # the source: the run read its own job.json as malformed records, and each run added
    # files to the source, so no build was ever up to date.
    source = project / "corpus"
    source.mkdir()
    (source / "web.jsonl").write_bytes((project / "web.jsonl").read_bytes())
    (project / "dirsource.json").write_text(
        json.dumps({"datasets": [{"name": "web", "path": str(source), "weight": 1}]})
    )
    monkeypatch.chdir(source)
    prep = [*PREP, "-c", str(project / "prep.yaml"), f"blend_path={project / 'dirsource.json'}"]
    result = CliRunner().invoke(app, prep)
    _assert_one_line_error(result, "('web')", f"the job directory {source / 'runs'}", "--job-dir")
    assert not (project / "out").exists()
    assert sorted(p.name for p in source.iterdir()) == ["web.jsonl"]  # refused before writing
    # With the job directory outside the source, the same run builds, and the next is cached.
    for cached in (False, True):
        result = CliRunner().invoke(app, [*prep, "--job-dir", str(project / f"jobs-{cached}")])
        assert result.exit_code == 0, result.output
        metadata = json.loads((project / "out" / "metadata.json").read_text())
        assert [f["path"] for f in metadata["sources"][0]["source"]["files"]] == [str(source / "web.jsonl")]
        assert ("nothing to do" in result.output) == cached, result.output


def test_sample_goes_to_its_own_directory(project):
    assert _prep().exit_code == 0
    out = project / "out"
    before = _tree_hashes(out)
    full_train = json.loads((out / "metadata.json").read_text())["counts"]["train"]["documents"]

    result = _prep("--sample", "5")
    assert result.exit_code == 0, result.output
    sample = project / "out-sample5"
    metadata = json.loads((sample / "metadata.json").read_text())
    assert metadata["config"]["sample"] == 5 and metadata["config"]["output_dir"] == str(sample)
    assert [s["rows"] for s in metadata["sources"]] == [5, 5]
    assert _tree_hashes(out) == before
    assert json.loads((out / "metadata.json").read_text())["counts"]["train"]["documents"] == full_train


def test_sample_into_the_full_builds_directory_is_refused_unless_forced(project):
    assert _prep().exit_code == 0
    out = project / "out"
    before = _tree_hashes(out)
    result = _prep("--sample", "5", f"output_dir={out}")
    _assert_one_line_error(result, str(out), "complete full build", "--force")
    assert _tree_hashes(out) == before

    forced = _prep("--sample", "5", f"output_dir={out}", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "metadata.json").read_text())["config"]["sample"] == 5
    # A full build may replace a sample build (it is what the sample stood in for).
    assert _prep().exit_code == 0
    assert json.loads((out / "metadata.json").read_text())["config"]["sample"] is None


def test_sample_over_a_damaged_record_is_one_line_or_a_rebuild_never_a_traceback(project):
    # The sample guard read the record's fields as mappings: `[]`, a config or counts of
    # another type, undecodable bytes ended in "error: AttributeError: ..." naming no file.
    assert _prep().exit_code == 0
    out = project / "out"
    good = json.loads((out / "metadata.json").read_text())
    refused = {
        "counts": (good | {"counts": {"train": 5}}, "complete full build"),
        "a list": ([], "no prep metadata.json"),
    }
    for name, (record, needle) in refused.items():
        (out / "metadata.json").write_text(json.dumps(record))
        before = _tree_hashes(out)
        _assert_one_line_error(_prep("--sample", "5", f"output_dir={out}"), str(out), needle)
        assert _tree_hashes(out) == before, name
    # A record that says nothing of a full build (config not a mapping, not UTF-8) is not one:
    # the sample rebuilds the directory as any run over a damaged record does.
    for record in (json.dumps(good | {"config": "x"}).encode(), b"\xff"):
        (out / "metadata.json").write_text(json.dumps(good))
        assert _prep().exit_code == 0
        (out / "metadata.json").write_bytes(record)
        result = _prep("--sample", "5", f"output_dir={out}")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "metadata.json").read_text())["config"]["sample"] == 5


def test_an_output_dir_holding_another_tools_data_is_refused_unless_forced(project):
    """A build replaces blend.json and every shard-named file under train/valid/test: an
    output_dir with no prep metadata.json (Megatron shards someone put there, a blend.json of
    another tool) lost them to the next prep without a word. Refused now, naming one, unless
    --force; files a build never touches (a README) do not stop it, and survive it."""
    out = project / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "wiki_00000.bin").write_bytes(b"megatron tokens")
    (out / "train" / "wiki_00000.idx").write_bytes(b"megatron index")
    (out / "blend.json").write_text('{"train": ["1.0", "wiki_00000"]}')
    before = _tree_hashes(out)
    result = _prep()
    _assert_one_line_error(
        result, f"{out} holds {out / 'blend.json'} (and 2 more) but no prep metadata.json", "--force"
    )
    assert _tree_hashes(out) == before
    (out / "metadata.json").write_text('{"written_by": "another tool"}')
    _assert_one_line_error(_prep(), "but no prep metadata.json")
    assert (out / "train" / "wiki_00000.bin").read_bytes() == b"megatron tokens"

    forced = _prep("--force")
    assert forced.exit_code == 0, forced.output
    assert not (out / "train" / "wiki_00000.bin").exists()
    # a prep output is replaced without --force (another build, same directory)
    (out / "README").write_text("notes\n")
    (project / "web.jsonl").write_text((project / "code.jsonl").read_text())
    rebuilt = _prep()
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "README").read_text() == "notes\n"


KILLED_PREP = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from nemotron.data import indexed, prep
    from nemotron.data.config import DataPrepConfig, TokenizerConfig

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    where = sys.argv[4]
    if where == "shard":  # kill -9 while the second output shard is being written
        real_finalize, shards = indexed.IndexedDatasetWriter.finalize, []
        def finalize(self):
            if "units" not in self.prefix.parts:
                shards.append(self.prefix)
                if len(shards) == 2:
                    die()
            return real_finalize(self)
        indexed.IndexedDatasetWriter.finalize = finalize
    elif where == "metadata":  # kill -9 with metadata.json's temporary file written
        real_write = prep.atomic_write_text
        def write(path, text):
            if Path(path).name == "metadata.json":
                Path(path).with_name(f".metadata.json.{os.getpid()}-0badc0de.tmp").write_text(text)
                die()
            return real_write(path, text)
        prep.atomic_write_text = write
    elif where == "swap":  # kill -9 half-way through swapping the new build in
        real_move, moves = prep._move, []
        def move(source, target):
            if Path(source).exists():
                moves.append(source)
                if len(moves) == 6:
                    die()
            real_move(source, target)
        prep._move = move

    root, out, tokenizer = sys.argv[1:4]
    cfg = DataPrepConfig(blend_path=root + "/blend.json", output_dir=out,
                         tokenizer=TokenizerConfig(model=tokenizer), num_shards=int(sys.argv[5]),
                         num_workers=1, work_unit_mb=0.004)
    prep.run_data_prep(cfg)
    """
)


@pytest.mark.parametrize("where", ["shard", "metadata", "swap"])
def test_prep_killed_late_then_rerun_leaves_no_temporary_files(project, bpe_dir, where):
    script = project / "killed_prep.py"
    script.write_text(KILLED_PREP)
    out, clean = project / "killed", project / "clean"

    def run(target: Path, kill_at: str, shards: int = 3) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), str(project), str(target), str(bpe_dir), kill_at, str(shards)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert run(clean, "nowhere").returncode == 0
    assert run(out, "nowhere", shards=2).returncode == 0  # an earlier, different complete build
    earlier = _tree_hashes(out)
    killed = run(out, where)
    assert killed.returncode == -9, killed.stderr
    if where != "swap":
        assert _tree_hashes(out) == earlier  # the earlier build is untouched until the swap
    rerun = run(out, "nowhere")
    assert rerun.returncode == 0, rerun.stderr
    leftovers = [
        str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".work"
    ]
    assert leftovers == []
    assert _comparable(out) == _comparable(clean)  # the new build, whole, nothing of the earlier one


def test_stray_temporary_files_of_an_older_version_are_removed(project):
    """Before the staging directory, killed writers left their temporaries beside the shards."""
    assert _prep().exit_code == 0
    out = project / "out"
    strays = [
        out / "train" / ".web_00001.bin.999999.1a2b3c4d.tmp",
        out / ".metadata.json.999999.tmp",
        out / ".blend.json.999999-1a2b3c4d.tmp",
    ]
    for path in strays:
        path.write_text("partial")
    assert _prep("--force").exit_code == 0
    assert not any(path.exists() for path in strays)


def test_a_rerun_removes_the_partial_files_of_killed_writers_first(project, bpe_dir, monkeypatch):
    """A prep killed while writing a shard leaves its partial file in the work directory,
    which a rerun of the same build keeps; the rerun removes it before any work (so failed
    reruns do not pile them up), never a live writer's (here: one of this process)."""
    from nemotron.data import prep as prep_module
    from nemotron.data.config import DataPrepConfig, TokenizerConfig
    from nemotron.utils.fs import temporary_name

    script = project / "killed_prep.py"
    script.write_text(KILLED_PREP)
    out = project / "killed"
    command = [sys.executable, str(script), str(project), str(out), str(bpe_dir), "shard", "3"]
    assert subprocess.run(command, capture_output=True, text=True, timeout=300).returncode == -9
    partial = sorted((out / ".work").rglob("*.tmp"))
    assert partial and all(p.parent.parent.name == "staging" for p in partial)
    live = temporary_name(partial[0].parent.parent.parent / "units" / "0000-live.train.bin")
    live.write_bytes(b"being written")

    seen: dict[str, list[Path]] = {}
    real = prep_module._run_units

    def run_units(*args, **kwargs):
        seen["at_start"] = [p for p in [*partial, live] if p.exists()]
        return real(*args, **kwargs)

    monkeypatch.setattr(prep_module, "_run_units", run_units)
    cfg = DataPrepConfig(
        blend_path=str(project / "blend.json"),
        output_dir=str(out),
        tokenizer=TokenizerConfig(model=str(bpe_dir)),
        num_shards=3,
        num_workers=1,
        work_unit_mb=0.004,
    )
    prep_module.run_data_prep(cfg)
    assert seen["at_start"] == [live]
