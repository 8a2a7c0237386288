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
