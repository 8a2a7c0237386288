"""The `nemotron` command line: the only place that prints and exits.

Start-up time rule: a command module imports at its top only what `nemotron -h` and option
parsing need; each command imports its heavy modules inside the command function. Measured
with `python -X importtime` (cumulative) on the 2-core CI machine, 2026-12-03:
`nemotron.cli.main` 0.5 s; `nemotron.config` (OmegaConf, the schema) 1.0 s;
`nemotron.artifacts.jobdir` 0.4 s; `nemotron.launch` (NeMo-Run) 15 s; `nemotron.train.loop`
(torch) ~4 s of CPU. So `nemotron nano3 pretrain -h` never imports torch or NeMo-Run.
"""
