"""Run `pretrain` from a pickled config and SIGKILL this process at a chosen train step.

    python _kill_runner.py CFG.pkl JOB_DIR [EVENT:STEP]

EVENT is "train" (killed right after that step's metrics are written) or "checkpoint"
(killed right after that step's checkpoint became complete and `latest` points at it).
"""

import os
import pickle
import signal
import sys

import torch

from nemotron.train import pretrain

torch.set_num_threads(1)


def main() -> None:
    cfg_path, job_dir = sys.argv[1], sys.argv[2]
    kill_event, kill_step = sys.argv[3].split(":") if len(sys.argv) > 3 else (None, None)
    with open(cfg_path, "rb") as f:
        cfg = pickle.load(f)

    def on_event(kind, payload):
        if kind == kill_event and str(payload["step"]) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain(cfg, job_dir, on_event=on_event)


if __name__ == "__main__":
    main()
