#!/usr/bin/env bash
# Seventeenth round (call 59): float32 weight gradients for the BF16 routed experts (train.experts_float32_grads).
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
case ${PART:-A} in
A)
  echo "=== kernel $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout 90 python3 benchmarks/expert_wgrad.py --iters 10 --out $OUT/expert_wgrad.json 2>&1 | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout 90 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_expert_grads.py 2>&1 | tail -8 | tee -a $OUT/suite.log
  stage bf16f32 train-bf16-mb3-accum4-ovl-f32g
  stage bf16 train-bf16-mb3-accum4-ovl
  stage fp8 $FP8
  [ -n "$AGAIN" ] && stage bf16f32b train-bf16-mb3-accum4-ovl-f32g
  ;;
P)
  tar -C / -xzf output/fp8/data.tgz
  if [ -n "$KERNEL" ]; then
    echo "=== kernel $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
    PYTHONPATH=$NEW timeout 60 python3 benchmarks/expert_wgrad.py --iters 10 --configs "128,128,64,8,3;128,256,64,8,3" --out $OUT/expert_wgrad.json 2>&1 | tee -a $OUT/suite.log
    [ -n "$GPUTESTS" ] && PYTHONPATH=$NEW timeout 60 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_expert_grads.py 2>&1 | tail -8 | tee -a $OUT/suite.log
  fi
  PYTHONPATH=$NEW timeout ${PT:-560} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes tensorwise --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --experts-float32-grads --seeds ${SEEDS:-1,2} --out $OUT/fp8_parity_f32g_seeds_$(echo ${SEEDS:-1,2} | tr , _)_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity.log | tail -30
  if [ -n "$THROUGHPUT" ]; then
    stage bf16f32 train-bf16-mb3-accum4-ovl-f32g
    stage bf16 train-bf16-mb3-accum4-ovl
  fi
  ;;
B)  # the BF16 runs with the key only, four seeds (the FP8 runs do not take it: fifteenth/sixteenth rounds'), then the proxy's BF16 throughput with and without it
  tar -C / -xzf output/fp8/data.tgz
  if [ -z "$NOKERNEL" ]; then
    echo "=== kernel $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
    PYTHONPATH=$NEW timeout 60 python3 benchmarks/expert_wgrad.py --iters 10 --configs "128,128,64,8,3;128,256,64,8,3" --out $OUT/expert_wgrad.json 2>&1 | tee -a $OUT/suite.log
  fi
  echo "=== parity $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout ${PT:-400} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes "" --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --experts-float32-grads --seeds ${SEEDS:-1,2,1234,3} --out $OUT/bf16_f32g_seeds_$(echo ${SEEDS:-1,2,1234,3} | tr , _)_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity.log | grep -v "step [0-9]*:" | tail -30
  stage bf16f32 train-bf16-mb3-accum4-ovl-f32g
  stage bf16 train-bf16-mb3-accum4-ovl
  ;;
B2)  # kernel bench, GPU tests of both weight-gradient kernels (shared tile helpers), the BF16-with-key parity runs
  tar -C / -xzf output/fp8/data.tgz
  echo "=== kernel $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout 60 python3 benchmarks/expert_wgrad.py --iters 10 --configs "128,128,64,8,3;128,256,64,8,3" --out $OUT/expert_wgrad.json 2>&1 | tee -a $OUT/suite.log
  echo "=== gpu tests $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout 120 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_expert_grads.py tests/train/test_gpu_fp8.py -k "weight_grad or expert or float64" 2>&1 | tail -8 | tee -a $OUT/suite.log
  echo "=== parity $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
  PYTHONPATH=$NEW timeout ${PT:-400} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes "" --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --experts-float32-grads --seeds ${SEEDS:-1,2,1234,3} --out $OUT/bf16_f32g_seeds_$(echo ${SEEDS:-1,2,1234,3} | tr , _)_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity.log | grep -v "step [0-9]*:" | tail -30
  ;;
T)  # same-run throughput: FP8, BF16, BF16 with the key
  stage fp8 $FP8
  stage bf16 train-bf16-mb3-accum4-ovl
  stage bf16f32 train-bf16-mb3-accum4-ovl-f32g
  ;;
esac
