#!/usr/bin/env bash
# CI stage "slurm": start a one-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd)
# on this machine, run the tests marked `slurm` (tests/launch/test_slurm.py: submission path,
# tiny data prep and pretrain attached, detached pretrain), and tear it down whatever happens
# (teardown.sh removes everything setup.sh created; setup.sh refuses to run beside a Slurm
# cluster that already runs here).
# The tests' profile starts distributed stages with 2 torchrun ranks on the node (pretrain: data
# parallel 2, both ranks checked to take part); data prep runs as one process, and as 2 Slurm
# tasks sharing the work units (byte-identical to a local run; a killed task's units redone).
# Needs root (apt-get and the daemons). Typical time: about 5 minutes (2 CPU cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# shellcheck source=.ci/slurm/common.sh
source "$ROOT/.ci/slurm/common.sh"

"$ROOT/.ci/slurm/setup.sh" || { "$ROOT/.ci/slurm/teardown.sh"; exit 1; }
trap '"$ROOT/.ci/slurm/teardown.sh"' EXIT
set -a
# shellcheck source=/dev/null
source "$STATE/env"  # the ports setup.sh picked (SLURM_CI_SSH_PORT)
set +a
cd "$ROOT"
NEMOTRON_SLURM_REQUIRED=1 "$PYTHON" -m pytest tests/launch -m slurm -q -p no:cacheprovider --timeout=900 "$@"
