"""`nemotron nano3 plan` and the performance rows of `pretrain --dry-run`."""

from __future__ import annotations


def test_plan_prints_the_recipe_layout_warnings_and_a_recommendation(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    result = cli("nano3", "plan", "--gpus", "8", "--gpus", "64", "--top", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "recipe layout" in out and "DP1 TP8 EP8 mb1" in out and "DP8 TP8 EP8 mb1" in out
    assert "warning: TP8 + SP has no communication overlap" in out
    assert "recommended for 8 GPUs:" in out and "recommended for 64 GPUs:" in out
    line = next(l for l in out.splitlines() if l.startswith("recommended for 8 GPUs"))
    assert "model.tensor_model_parallel_size=1" in line  # FSDP (+ EP) without TP
    assert "assumptions, not measurements" in out


def test_plan_reports_layouts_that_cannot_be_built(cli):
    result = cli("nano3", "plan", "--gpus", "12", "--top", "1")
    assert result.exit_code == 0, result.output
    assert "12 GPUs, recipe layout" in result.output and "not divisible by TP*CP*PP" in result.output


def test_plan_bad_override_is_one_error_line(cli):
    result = cli("nano3", "plan", "model.tensor_model_parallel_sise=2")
    assert result.exit_code != 0
    assert "unknown key" in result.output and "Traceback" not in result.output


def test_pretrain_dry_run_predicts_memory_and_speed(cli, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = cli("nano3", "pretrain", "-d")
    assert result.exit_code == 0, result.output
    out = result.output
    predicted = next(l for l in out.splitlines() if l.startswith("predicted"))
    assert "8 GPUs, DP1 TP8 EP8 mb1" in predicted and "GiB per GPU (fits" in predicted
    assert any(l.startswith("warning") and "TP8" in l for l in out.splitlines())
    faster = next(l for l in out.splitlines() if l.startswith("faster"))
    assert "model.tensor_model_parallel_size=1" in faster
    monkeypatch.setenv("WORLD_SIZE", "64")
    result = cli("nano3", "pretrain", "-d")
    assert "64 GPUs, DP8 TP8 EP8" in result.output
    # a CPU recipe gets no GPU prediction (one process: tiny's batch of 16 fits no 64-way DP)
    monkeypatch.delenv("WORLD_SIZE")
    result = cli("nano3", "pretrain", "-c", "tiny", "-d")
    assert result.exit_code == 0 and "predicted" not in result.output


def test_profile_dry_run_predicts_for_the_profiles_gpus(cli):
    (cli.work / "env.toml").write_text(
        '[cluster]\nexecutor = "slurm"\nnodes = 8\ngpus_per_node = 8\naccount = "a"\n'
        'partition = "p"\ntunnel = "local"\n'
    )
    result = cli("nano3", "pretrain", "-d", "--batch", "cluster")
    assert result.exit_code == 0, result.output
    predicted = next(l for l in result.output.splitlines() if l.startswith("predicted"))
    assert "64 GPUs, DP8 TP8 EP8" in predicted


def test_plan_json(cli):
    import json

    result = cli("nano3", "plan", "--gpus", "8", "--top", "1", "--json")
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)
    recipe = next(p for p in plans if p.get("role") == "recipe")
    assert recipe["layout"]["tp"] == 8 and recipe["memory_fits"] is True
    fastest = next(p for p in plans if p.get("role") == "fastest")
    assert fastest["tokens_per_second_per_gpu"] > recipe["tokens_per_second_per_gpu"]


def test_plan_pipeline_rows_are_plain_with_compile(cli, monkeypatch):
    """PP layouts (with TP too) are plain rows, also with train.compile: each block is compiled
    (`train.loop.compile_model`); the plan marked them "(refused)" when the stages were not."""
    monkeypatch.setenv("COLUMNS", "250")
    pp = ["-c", "long_context", "--gpus", "256", "--top", "1"]
    for extra in ([], ["train.compile=true"]):
        result = cli("nano3", "plan", *pp, *extra)
        assert result.exit_code == 0, result.output
        row = next(l for l in result.output.splitlines() if "PP4" in l and "TP8" in l)
        assert "refused" not in row and "n/a" not in row, extra
        assert "train.compile" not in result.output, extra


def test_plan_gpu_count_no_layout_can_be_built_on_is_a_flag_error(cli):
    """7 GPUs: 3072 sequences split over no data-parallel size that 7 allows, and no model-parallel
    size divides 7: one error naming --gpus and why (exit 2), not "no layout fits" (which says
    the memory is the problem: it is for 2 GPUs)."""
    result = cli("nano3", "plan", "--gpus", "7")
    assert result.exit_code == 2, result.output
    assert "--gpus 7: no layout can be built on 7 GPUs" in result.output
    assert "train.global_batch_size: 3072 is not divisible" in result.output
    assert "Traceback" not in result.output and "fits" not in result.output
    result = cli("nano3", "plan", "--gpus", "2", "--top", "1")
    assert result.exit_code == 0, result.output
    assert "2 GPUs: no layout fits in the memory of 2 GPUs" in result.output


def test_recommended_overrides_select_the_recommended_layout():
    """Applied to the recipe, a recommendation's overrides give exactly its layout: a layout
    without PP on the PP4 long-context recipe sets the pipeline size back to 1, one with PP sets
    the schedule and split it was planned with."""
    from nemotron.cli.plan import _overrides
    from nemotron.config import PretrainConfig, load_config, resolve_config_path
    from nemotron.train import perf_model as pm

    path = resolve_config_path("long_context", PretrainConfig)
    cfg = load_config(path, [], PretrainConfig)
    plans = pm.recommend(cfg.model.arch(), 256, pm.shape_from_config(cfg), include_pp=True)
    assert {p.layout.pp for p in plans} >= {1, 2}
    for pp in (1, 2):
        plan = next(p for p in plans if p.layout.pp == pp)
        applied = load_config(path, _overrides(plan.layout).split(), PretrainConfig)
        assert pm.layout_from_config(applied, 256) == plan.layout, pp


def test_plan_shows_each_pipeline_schedules_own_bubble(cli, monkeypatch):
    """The same PP4 layout under 1F1B and Interleaved1F1B: the table gains a PP bubble column,
    and the interleaved schedule's bubble is the smaller (half the idle time at V=2, the same
    sends), with no "not modelled" note left."""
    import json

    monkeypatch.setenv("COLUMNS", "250")
    layout = ["--gpus", "64", "--top", "0", "model.pipeline_model_parallel_size=4"]
    layout += ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false"]
    bubbles = {}
    for schedule in ("1F1B", "Interleaved1F1B"):
        result = cli("nano3", "plan", *layout, f"model.pipeline_schedule={schedule}")
        assert result.exit_code == 0, result.output
        assert "PP bubble" in result.output and "not modelled" not in result.output
        result = cli("nano3", "plan", *layout, f"model.pipeline_schedule={schedule}", "--json")
        (recipe,) = [p for p in json.loads(result.output) if p.get("role") == "recipe"]
        assert recipe["layout"]["pipeline_schedule"] == schedule
        bubbles[schedule] = recipe["step"]["pipeline_bubble"]
    assert 0 < bubbles["Interleaved1F1B"] < bubbles["1F1B"]
    result = cli("nano3", "plan", "--gpus", "8", "--top", "0")
    assert "PP bubble" not in result.output  # no pipelined layout: the table as before
