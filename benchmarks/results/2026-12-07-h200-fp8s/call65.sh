#!/usr/bin/env bash
# Nineteenth round: the speed half of issue 20 with the code whose loss parity the eighteenth round
# measured over four seeds: the proxy's FP8 and BF16 tokens/s in one call on one H200, FP8 first
# (it tunes its casts), BF16, then FP8 again and BF16 again while time is left, so each setting has
# a run on a warm machine. Same stages and settings as call63.sh, without its parity stage.
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $OUT/suite.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site output/fp8/whl/*.whl || exit 1
NEW=/tmp/site:$PWD/src
FP8=train-bf16-mb3-accum4-ovl-fp8t-lmrows24576-xg-xw-at
BF16=train-bf16-mb3-accum4-ovl
export FP8_LAYERS=mamba,attention,shared_expert,experts,lm_head
export TRAIN_LIMIT=${TRAIN_LIMIT:-300}
stage() { # name stage
  local name=$1 st=$2
  echo "=== $name $st $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW OUT=/tmp/r/$name bash benchmarks/h200_suite.sh $st 2>&1 | grep -v "SyntaxWarning\|Configuration class for applying" | tee -a $OUT/suite.log
  cp /tmp/r/$name/$st.json $OUT/${name}_$(date -u +%H%M%S).json 2>/dev/null
  cat /tmp/r/$name/rows.md >> $OUT/rows.md 2>/dev/null
}
stage fp8 $FP8
stage bf16 $BF16
left=$(( ${BUDGET:-585} - SECONDS ))
if [ $left -ge 70 ]; then TRAIN_LIMIT=$left stage fp8b $FP8; fi
left=$(( ${BUDGET:-585} - SECONDS ))
if [ $left -ge 60 ]; then TRAIN_LIMIT=$left stage bf16b $BF16; fi
echo "=== done $(date -u +%H:%M:%S), ${SECONDS} s" | tee -a $OUT/suite.log
