#!/usr/bin/env bash
# Eighteenth round, last call: seed 3's FP8 run alone (its BF16 run is the sixteenth round's), then
# the proxy's FP8 and BF16 tokens/s in the same call, both with call61.sh's code and settings. One
# call where the session's device time leaves room for one start only.
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
PART=F SEEDS=3 PT=${PT:-240} OUT=$OUT bash benchmarks/results/2026-12-06-h200-fp8q/call61.sh
PART=T AGAIN=$AGAIN TRAIN_LIMIT=${TRAIN_LIMIT:-300} OUT=$OUT bash benchmarks/results/2026-12-06-h200-fp8q/call61.sh
