# Paths shared by setup.sh, teardown.sh and run_tests.sh (sourced, not run).
# shellcheck shell=bash disable=SC2034
# Everything the CI cluster writes, and the record of what it created and started.
STATE="${SLURM_CI_STATE:-/var/lib/nemotron-ci-slurm}"
# The test sshd's keys (tests/launch/conftest.py reads the default path).
SSH_DIR="${SLURM_CI_SSH_DIR:-/var/lib/nemotron-ci-ssh}"
SLURM_CONFS=(/etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf)
KNOWN_HOSTS_MARK=nemotron-ci-sshd       # ends the line setup.sh adds to /etc/ssh/ssh_known_hosts
MUNGE_SOCKET=/run/munge/munge.socket.2  # munge's default (what Slurm's tools connect to)
