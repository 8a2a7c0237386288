# Paths shared by setup.sh, teardown.sh and run_tests.sh (sourced, not run).
# shellcheck shell=bash disable=SC2034
STATE=/var/lib/nemotron-ci-slurm        # everything the CI cluster writes, and what it created
SSH_DIR=/var/lib/nemotron-ci-ssh        # the test sshd's keys (tests/launch/conftest.py reads it)
SLURM_CONFS=(/etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf)
KNOWN_HOSTS_MARK=nemotron-ci-sshd       # ends the line setup.sh adds to /etc/ssh/ssh_known_hosts
MUNGE_SOCKET=/run/munge/munge.socket.2  # munge's default (what Slurm's tools connect to)
