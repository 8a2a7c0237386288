#!/usr/bin/env bash
# FP8 stage: this code vs 3f39522 (before the backward-autocast and kernel-helper change), same call
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site output/fp8/whl/*.whl || exit 1
FP8=train-bf16-mb3-accum4-ovl-fp8t-lmrows24576-xg-xw-at
export FP8_LAYERS=mamba,attention,shared_expert,experts,lm_head
for v in ${ORDER:-prev new}; do
  if [ $v = prev ]; then P=/tmp/site:$PWD/output/prev/src; else P=/tmp/site:$PWD/src; fi
  echo "=== $v $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$P OUT=/tmp/r/$v TRAIN_LIMIT=200 bash benchmarks/h200_suite.sh $FP8 2>&1 | grep "proxy\|rc=\|Error" | tee -a $OUT/suite.log
  cp /tmp/r/$v/$FP8.json $OUT/fp8_$v.json 2>/dev/null
done
