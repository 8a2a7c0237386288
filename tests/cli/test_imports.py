"""`nemotron --help` answers at once: the CLI imports torch (and the library) only inside the
commands that run something."""

from __future__ import annotations

import os
import subprocess
import sys

import nemotron

SRC = os.path.dirname(os.path.dirname(nemotron.__file__))

CHECK = """
import sys
import nemotron.cli.main as main
heavy = [m for m in ("torch", "numpy", "nemotron.config", "nemotron.train.loop") if m in sys.modules]
assert not heavy, f"importing the CLI imported {heavy}"
for argv in (["--help"], ["nano3", "pretrain", "--help"], ["nano3", "data", "prep", "pretrain", "--help"]):
    try:
        main.app(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
    assert "torch" not in sys.modules, f"nemotron {' '.join(argv)} imported torch"
# A dry run shows the whole plan (config, layout, steps) without the training stack.
try:
    main.app(["nano3", "pretrain", "-c", "default", "--dry-run"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert "torch" not in sys.modules, "nemotron nano3 pretrain --dry-run imported torch"
"""


def test_cli_and_help_do_not_import_torch():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


PREP_CHECK = """
import json, sys
from pathlib import Path
import nemotron.cli.main as main
root = Path(sys.argv[1])
try:
    main.app(["nano3", "data", "prep", "pretrain", "-c", str(root / "prep.yaml"), "--job-dir", str(root / "job")])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert json.loads((root / "out" / "metadata.json").read_text())["counts"]["train"]["documents"] > 0
heavy = [m for m in ("torch", "nemo_run") if m in sys.modules]
assert not heavy, f"a data prep run imported {heavy}"
"""


def test_a_data_prep_run_does_not_import_torch_or_nemo_run(tmp_path):
    """Data prep needs neither: importing them (through nemotron.launch) cost 4 CPU-seconds a run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    docs = [f"document {i} about tokens and shards and experts" for i in range(200)]
    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "blend.json").write_text('{"datasets": [{"name": "a", "path": "a.jsonl", "weight": 1}]}')
    (tmp_path / "prep.yaml").write_text(
        f"blend_path: {tmp_path / 'blend.json'}\noutput_dir: {tmp_path / 'out'}\n"
        f"tokenizer:\n  model: {tmp_path / 'tokenizer.json'}\n  eos_token: '</s>'\nnum_shards: 2\nnum_workers: 1\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NEMOTRON_JOB_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", PREP_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
