from rich.console import Console

from nemotron.cli.progress import TrainProgress


def test_train_progress_renders_bar_and_milestones():
    console = Console(record=True, width=140, force_terminal=False, log_path=False)  # as the CLI's
    hook = TrainProgress(console)
    hook("start", {"total_steps": 4, "step": 0})
    for step in (1, 2, 3, 4):
        hook(
            "train",
            {
                "step": step,
                "loss": 5.5 - step,
                "lm_loss": 5.0 - step,
                "lr": 1e-3,
                "tokens_per_second": 1234.0,
            },
        )
    hook("eval", {"step": 4, "loss": 1.5, "ppl": 4.48})  # what pretrain's metrics emit
    hook("checkpoint", {"step": 4, "path": "/ckpt/iter_0000004"})
    hook("final_pass", {"step": 4})
    hook("eval", {"step": 4, "loss": 1.25, "ppl": 3.49})
    hook("test", {"step": 4, "loss": 1.75, "ppl": 5.75})
    hook("end", {})
    text = console.export_text()
    # The LM loss (as the summary's final LM loss), not the loss with the balance term.
    assert "4/4" in text and "LM loss 1.0000" in text and "1,234 tok/s (last step)" in text
    assert "loss 1.5000  lr" not in text
    lines = [line.rstrip() for line in text.splitlines()]
    assert any(line.endswith("valid loss 1.5000 at step 4") for line in lines)  # periodic: unlabelled
    # the second valid loss of the last step says it is the final pass's
    assert any(line.endswith("valid loss 1.2500 at step 4 (final pass)") for line in lines)
    assert any(line.endswith("test loss 1.7500 at step 4") for line in lines)
    assert "checkpoint saved: /ckpt/iter_0000004" in text


def test_single_process_says_which_layout_it_does_not_apply():
    console = Console(record=True, width=160, force_terminal=False)
    hook = TrainProgress(console, show_bar=False)
    hook("start", {"total_steps": 1, "step": 0, "ignored_layout": "TP8 EP8 SP"})
    hook("end", {})
    assert "one process: TP8 EP8 SP not applied" in console.export_text()


def test_prep_progress_shows_warnings_and_units_done_per_task():
    from nemotron.cli.progress import PrepProgressView
    from nemotron.data.prep import PrepProgress

    console = Console(record=True, width=160, force_terminal=False)
    view = PrepProgressView(console, show_bar=False)
    view(PrepProgress(phase="plan", warning="num_workers=1 leaves 3 of the 4 CPUs this process may use idle"))
    view(
        PrepProgress(phase="tokenize", units_done=3, units_total=10, tasks={"task 0 (a)": 2, "task 1 (b)": 1})
    )
    view(
        PrepProgress(phase="tokenize", units_done=3, units_total=10, tasks={"task 0 (a)": 2, "task 1 (b)": 1})
    )
    view(
        PrepProgress(phase="tokenize", units_done=5, units_total=10, tasks={"task 0 (a)": 3, "task 1 (b)": 2})
    )
    view.stop()
    text = console.export_text()
    assert "warning: num_workers=1 leaves 3 of the 4 CPUs" in text
    assert text.count("units done per task: task 0 (a) 2, task 1 (b) 1") == 1  # only when it changes
    assert "units done per task: task 0 (a) 3, task 1 (b) 2" in text


def test_cli_console_lines_do_not_name_the_source_line():
    """`console.log` would append its caller (always cli/progress.py:NN), noise to a user."""
    from nemotron.cli.common import console

    with console.capture() as captured:
        TrainProgress(console, show_bar=False)("checkpoint", {"step": 1, "path": "/ckpt/iter_0000001"})
    text = captured.get()
    assert "checkpoint saved: /ckpt/iter_0000001" in text and "progress.py" not in text


def test_pretrain_summary_leaves_out_unset_values():
    """A fresh run has no `resumed_from`, `finetuned_from` or `problem`: no row prints 'None'."""
    from nemotron.cli.pretrain import _summary_rows

    rows = dict(
        _summary_rows(
            {
                "status": "completed",
                "steps": 300,
                "final_loss": 4.79,
                "valid_loss": 4.41,
                "resumed_from": None,
                "finetuned_from": "/ckpt/iter_0000300",
                "problem": None,
            }
        )
    )
    assert rows == {
        "steps": "300",
        "final LM loss (last step)": "4.7900",
        "valid loss": "4.41",
        "finetuned from": "/ckpt/iter_0000300",
    }


def test_start_says_where_the_run_resumed_or_which_weights_it_took():
    console = Console(record=True, width=160, force_terminal=False, log_path=False)
    hook = TrainProgress(console, show_bar=False)
    hook(
        "start", {"total_steps": 60, "step": 20, "resumed_from": "/ckpt/iter_0000020", "finetuned_from": None}
    )
    hook("end", {})
    hook = TrainProgress(console, show_bar=False)
    hook("start", {"total_steps": 9, "step": 0, "resumed_from": None, "finetuned_from": "/main/iter_0000300"})
    hook("start", {"total_steps": 9, "step": 0, "resumed_from": None, "finetuned_from": None})
    hook("end", {})
    lines = [line.strip() for line in console.export_text().splitlines()]
    assert [line.split("] ", 1)[-1] for line in lines if line] == [
        "resumed from /ckpt/iter_0000020 at step 20",
        "started from the weights of /main/iter_0000300 (finetune)",
    ]


def _events(hook, path="/runs/[exp]/iter_0000002"):
    hook("start", {"total_steps": 1_000_000, "step": 0})
    for step in (1, 2):
        hook(
            "train",
            {"step": step, "loss": 2.5, "lm_loss": 2.1234567, "lr": 3e-4, "tokens_per_second": 123456789.0},
        )
    hook("checkpoint", {"step": 2, "path": path})
    hook("warning", {"step": 2, "message": "data.mixed_length_blends[0].blend /d/[train]/blend.json differs"})
    hook("end", {})


def test_off_a_terminal_every_logged_step_is_one_whole_line():
    """A Slurm log or a pipe: Rich drew the bar once, at the end, in 80 columns, cutting the
    step count to "…" ("train ━… 0:0… LM loss ..."), and wrapped long lines. Now one line per
    logged step with every number, and no line is cut or wrapped."""
    console = Console(record=True, width=80, force_terminal=False, log_path=False)
    _events(TrainProgress(console))
    lines = console.export_text().splitlines()
    step_lines = [line for line in lines if " step " in f" {line}" and "LM loss" in line]
    assert [line.split("] ", 1)[1] for line in step_lines] == [
        f"step {s}/1000000  LM loss 2.1235  lr 3.00e-04  123,456,789 tok/s (last step)" for s in (1, 2)
    ]
    assert "…" not in console.export_text() and "━" not in console.export_text()  # no squeezed bar
    # Library text is not markup: the path keeps its "[exp]", the warning its "[train]".
    assert any(line.endswith("checkpoint saved: /runs/[exp]/iter_0000002") for line in lines)
    assert any(
        line.endswith("warning: data.mixed_length_blends[0].blend /d/[train]/blend.json differs")
        for line in lines
    )


def test_on_a_terminal_the_bar_stays_and_paths_are_not_markup():
    console = Console(record=True, width=200, force_terminal=True, log_path=False)
    _events(TrainProgress(console))
    text = console.export_text()
    assert "2/1000000" in text and "LM loss 2.1235" in text  # the bar, not step lines
    assert "step 2/1000000" not in text
    assert "checkpoint saved: /runs/[exp]/iter_0000002" in text
    assert "/d/[train]/blend.json" in text


def test_without_the_bar_no_step_lines_either():
    console = Console(record=True, width=80, force_terminal=False, log_path=False)
    _events(TrainProgress(console, show_bar=False))
    assert "LM loss" not in console.export_text()


def test_prep_off_a_terminal_writes_whole_lines_at_every_tenth_of_the_units():
    from nemotron.cli.progress import PrepProgressView
    from nemotron.data.prep import PrepProgress

    console = Console(record=True, width=80, force_terminal=False, log_path=False)
    view = PrepProgressView(console)
    for done in range(0, 21):
        view(
            PrepProgress(
                phase="tokenize",
                units_done=done,
                units_total=20,
                documents=1_000_000 * done,
                tokens=987_654_321 * done,
                elapsed_s=1.0,
            )
        )
    view(PrepProgress(phase="done", units_done=20, units_total=20))
    lines = [line.split("] ", 1)[1] for line in console.export_text().splitlines() if "units" in line]
    assert len(lines) == 11 and lines[0].startswith("tokenize 0/20 units  0 docs")
    assert lines[-1] == "tokenize 20/20 units  20,000,000 docs  19,753,086,420 tokens  19,753,086,420 tok/s"
    assert "…" not in console.export_text()


def test_stop_line_says_whether_the_step_was_checkpointed():
    """A stop at a skipped step saves nothing (`Trainer.save`): the line must not say "saved"."""
    console = Console(record=True, width=200, force_terminal=False, log_path=False)
    hook = TrainProgress(console, show_bar=False)
    hook(
        "stop",
        {"step": 5, "signal": 15, "checkpoint": "/ckpt/iter_0000005", "resume_from": "/ckpt/iter_0000005"},
    )
    hook("stop", {"step": 7, "signal": 15, "checkpoint": None, "resume_from": "/ckpt/iter_0000003"})
    hook("stop", {"step": 2, "signal": 10, "checkpoint": None, "resume_from": None})
    lines = console.export_text().splitlines()
    assert lines[0].endswith("signal 15 at step 5: checkpoint /ckpt/iter_0000005 saved, stopping")
    assert "warning: signal 15 at step 7: stopping without a checkpoint of this step" in lines[1]
    assert lines[1].endswith("a rerun resumes from /ckpt/iter_0000003") and "saved" not in lines[1]
    assert lines[2].endswith("a rerun starts from the beginning (no checkpoint yet)")
