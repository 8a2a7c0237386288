"""Run the `nemotron` CLI with writes limited to MAX_BYTES per file (0: no limit).

    python _fsize_runner.py MAX_BYTES nano3 pretrain ...

A write past the limit fails with EFBIG ("File too large") the way a write on a full disk fails
with ENOSPC; SIGXFSZ is ignored so that the write returns the error instead of killing us. The
limit is set after the imports (which may write caches).
"""

import resource
import signal
import sys

import torch

from nemotron.cli.main import app

torch.set_num_threads(1)


def main() -> None:
    max_bytes = int(sys.argv[1])
    if max_bytes:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    sys.argv = ["nemotron", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()
