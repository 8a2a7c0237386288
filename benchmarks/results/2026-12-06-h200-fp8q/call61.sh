#!/usr/bin/env bash
# Eighteenth round (call 61): the FP8 routed experts' weight gradients rounded to BF16 per
# micro-batch by default, as the BF16 experts' are (train.experts_float32_grads now governs both).
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $OUT/suite.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site output/fp8/whl/*.whl || exit 1
NEW=/tmp/site:$PWD/src
FP8=train-bf16-mb3-accum4-ovl-fp8t-lmrows24576-xg-xw-at
export FP8_LAYERS=mamba,attention,shared_expert,experts,lm_head
stage() { # name stage
  local name=$1 st=$2
  echo "=== $name $st $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW OUT=/tmp/r/$name bash benchmarks/h200_suite.sh $st 2>&1 | grep -v "SyntaxWarning\|Configuration class for applying" | tee -a $OUT/suite.log
  cp /tmp/r/$name/$st.json $OUT/${name}_$(date -u +%H%M%S).json 2>/dev/null
  cat /tmp/r/$name/rows.md >> $OUT/rows.md 2>/dev/null
}
case ${PART:-P} in
P)  # four-seed parity of the default (no key): BF16 and FP8 both round the experts' weight gradients to BF16
  tar -C / -xzf output/fp8/data.tgz
  echo "=== parity $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout ${PT:-560} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes tensorwise --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --layers ${LAYERS:-14} --seeds ${SEEDS:-1,2} --out $OUT/fp8_parity_L${LAYERS:-14}_seeds_$(echo ${SEEDS:-1,2} | tr , _)_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity.log | grep -v "step [0-9]*:" | tail -30
  ;;
F)  # FP8 runs alone for seeds with BF16 runs of earlier rounds (--no-bf16; compared by --combine --bf16-from), then BF16 + FP8 for $PAIR
  tar -C / -xzf output/fp8/data.tgz
  echo "=== gpu tests $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout 60 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_fp8.py -k "weight_grad_kernels" 2>&1 | tail -3 | tee -a $OUT/suite.log
  echo "=== parity fp8 only $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout ${PT:-340} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes tensorwise --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --no-bf16 --seeds ${SEEDS:-1,2,3} --out $OUT/fp8only_seeds_$(echo ${SEEDS:-1,2,3} | tr , _)_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity_fp8only.log | grep -v "step [0-9]*:" | tail -20
  if [ -n "$PAIR" ]; then
    echo "=== parity pair $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
    PYTHONPATH=$NEW timeout ${PT2:-230} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes tensorwise --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --seeds $PAIR --out $OUT/fp8_parity_seeds_$(echo $PAIR | tr , _)_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity_pair.log | grep -v "step [0-9]*:" | tail -20
  fi
  ;;
T)  # GPU kernel tests, then same-run throughput: FP8, BF16 (and FP8 again)
  echo "=== gpu tests $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout 90 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_fp8.py -k "weight_grad_kernels" 2>&1 | tail -4 | tee -a $OUT/suite.log
  stage fp8 $FP8
  stage bf16 train-bf16-mb3-accum4-ovl
  [ -n "$AGAIN" ] && stage fp8b $FP8
  ;;
esac
