#!/usr/bin/env bash
# Eighteenth round, last call, call62.sh's work in an order that fits one 600 s command: the GPU
# test of the weight-gradient kernels once (call62.sh runs it in each of its two parts), the
# proxy's FP8 and BF16 tokens/s in the same call, then seed 3's FP8 run alone (its BF16 run is the
# sixteenth round's) in the time left, then FP8's tokens/s again if 70 s are left. Same code,
# settings and stages as call61.sh. The stages took 217 s (FP8, first: it tunes its casts), 49 s
# (BF16), 23-40 s (FP8 again) and ~170 s (a seed's FP8 run alone) on 2026-12-06.
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $OUT/suite.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site output/fp8/whl/*.whl || exit 1
NEW=/tmp/site:$PWD/src
FP8=train-bf16-mb3-accum4-ovl-fp8t-lmrows24576-xg-xw-at
export FP8_LAYERS=mamba,attention,shared_expert,experts,lm_head
export TRAIN_LIMIT=${TRAIN_LIMIT:-300}  # the first FP8 stage tunes its casts: 217 s on 2026-12-06
stage() { # name stage
  local name=$1 st=$2
  echo "=== $name $st $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW OUT=/tmp/r/$name bash benchmarks/h200_suite.sh $st 2>&1 | grep -v "SyntaxWarning\|Configuration class for applying" | tee -a $OUT/suite.log
  cp /tmp/r/$name/$st.json $OUT/${name}_$(date -u +%H%M%S).json 2>/dev/null
  cat /tmp/r/$name/rows.md >> $OUT/rows.md 2>/dev/null
}
tar -C / -xzf output/fp8/data.tgz
echo "=== gpu tests $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
PYTHONPATH=$NEW timeout 90 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_fp8.py -k "weight_grad_kernels" 2>&1 | tail -4 | tee -a $OUT/suite.log
stage fp8 $FP8
stage bf16 train-bf16-mb3-accum4-ovl
left=$(( ${BUDGET:-585} - SECONDS ))
echo "=== parity fp8 only $(date -u +%H:%M:%S), ${left} s left" | tee -a $OUT/suite.log
# (`timeout 0` would mean no limit: under a minute left, no run)
[ $left -ge 60 ] && PYTHONPATH=$NEW timeout $left python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes tensorwise --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --no-bf16 --seeds 3 --out $OUT/fp8only_seeds_3_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity_fp8only.log | grep -v "step [0-9]*:" | tail -20
left=$(( ${BUDGET:-585} - SECONDS ))
if [ $left -ge 70 ]; then TRAIN_LIMIT=$left stage fp8b $FP8; fi
echo "=== done $(date -u +%H:%M:%S), ${SECONDS} s" | tee -a $OUT/suite.log
