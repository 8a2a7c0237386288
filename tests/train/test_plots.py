import pytest
from typer.testing import CliRunner

from nemotron.cli.main import app
from nemotron.train import pretrain
from nemotron.train.plots import plot_run

from .conftest import make_config


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("plotrun")
    pretrain(make_config(root, blend=corpus[0], checkpoint={"save": None}), root / "job")
    return root / "job"


def test_plot_writes_loss_lr_and_balance_pngs(run_dir, tmp_path):
    paths = plot_run(run_dir, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["balance.png", "loss.png", "lr.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_cli_plot_command(run_dir):
    result = CliRunner().invoke(app, ["nano3", "plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "plots" / "loss.png").exists() and "loss.png" in result.output


def test_cli_plot_of_a_dir_without_metrics_fails_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["nano3", "plot", str(tmp_path)])
    assert result.exit_code == 1 and "metrics.jsonl does not exist" in result.output


def test_cli_plot_of_a_metrics_path_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    result = CliRunner().invoke(app, ["nano3", "plot", str(tmp_path), "-o", str(tmp_path / "plots")])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert (
        line == f"error: {tmp_path}/metrics.jsonl is not a file (a training run writes its metrics there)"
    ), line


_TRAIN = '{"kind": "train", "step": 1, "lm_loss": 5.0, "lr": 0.001}\n'


def test_cli_plot_into_a_path_through_a_file_names_it(tmp_path):
    """`-o` under a file (or onto one): one line naming the output and the file, not "error:
    FileExistsError: [Errno 17] File exists: '...'" naming only the file."""
    (tmp_path / "metrics.jsonl").write_text(_TRAIN)
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file" / "plots", tmp_path / "a_file"):
        result = CliRunner().invoke(app, ["nano3", "plot", str(tmp_path), "-o", str(out)])
        assert result.exit_code == 1, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {out}: {tmp_path / 'a_file'} is a file, not a directory"), line
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"kind": "run", "step": 0}\n', "metrics.jsonl has no training records yet"),
        (_TRAIN + "[1, 2]\n", "metrics.jsonl:2 is a JSON list, not a metrics record"),
        (_TRAIN + '{"kind": "train", "step": "2"}\n', "metrics.jsonl:2 has no step"),
        (
            '{"kind": "train", "step": 1, "lm_loss": 5.0, "lr": 1e308}\n',
            "metrics.jsonl: its values cannot be drawn",
        ),
    ],
    ids=["no-train-records", "not-an-object", "step-a-string", "a-value-near-float-max"],
)
def test_cli_plot_of_an_unreadable_record_is_one_line_naming_the_file(tmp_path, content, needle):
    """The error line is the message naming the file and line, without a Python class in front
    ("error: ValueError: ..." before); a value matplotlib cannot place on an axis (lr 1e308)
    is named too (before: "error: ValueError: arange: cannot compute length", no file)."""
    (tmp_path / "metrics.jsonl").write_text(content)
    result = CliRunner().invoke(app, ["nano3", "plot", str(tmp_path), "-o", str(tmp_path / "plots")])
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}/metrics.jsonl") and needle in line, line


def test_a_byte_order_mark_before_the_first_record_is_skipped(tmp_path):
    """An editor that saved metrics.jsonl may put a UTF-8 byte-order mark first, as the other
    text files the CLI reads allow (`utils.fs.read_text`)."""
    (tmp_path / "metrics.jsonl").write_bytes(b"\xef\xbb\xbf" + _TRAIN.encode())
    paths = plot_run(tmp_path, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["loss.png", "lr.png"]


def test_a_non_finite_loss_is_a_gap_and_a_warning_not_left_out(tmp_path):
    """The logger writes a diverged step's loss as "nan" (JSON has no NaN): the plot draws it as
    a gap (left out, its neighbours would be joined across it) and says at which steps."""
    lines = [
        '{"kind": "train", "step": %d, "lm_loss": %s, "lr": 0.001}' % (step, loss)
        for step, loss in ((1, "5.0"), (2, '"nan"'), (3, '"inf"'), (4, "4.0"))
    ]
    lines.append('{"kind": "eval", "step": 4, "loss": "nan"}')
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    warnings: list[str] = []
    plot_run(tmp_path, tmp_path / "plots", on_warning=warnings.append)
    metrics = tmp_path / "metrics.jsonl"
    assert warnings == [
        f"{metrics}: train lm_loss is not a finite number at step(s) 2, 3; drawn as gaps",
        f"{metrics}: eval loss is not a finite number at step(s) 4; drawn as gaps",
    ]
    result = CliRunner().invoke(app, ["nano3", "plot", str(tmp_path), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "step(s) 2, 3; drawn as gaps" in result.stderr


def test_series_keeps_a_non_finite_value_in_its_place():
    from nemotron.train.plots import _series

    records = [
        {"kind": "train", "step": 1, "lm_loss": 5.0},
        {"kind": "train", "step": 2, "lm_loss": "nan"},
        {"kind": "train", "step": 3, "lm_loss": "-inf"},
        {"kind": "train", "step": 4, "lm_loss": "some text"},
        {"kind": "eval", "step": 4, "lm_loss": 1.0},
    ]
    steps, values = _series(records, "train", "lm_loss")
    assert steps == [1, 2, 3] and values[0] == 5.0
    assert all(v != v for v in values[1:])  # NaN: a gap where the value was
