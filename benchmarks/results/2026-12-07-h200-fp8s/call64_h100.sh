#!/usr/bin/env bash
# Eighteenth round, seed 3's FP8 run on an H100 (no H200 lent for six sessions): call63.sh's
# parity stage alone, same code, settings and command. Its peak on the H200 was 77.93 GiB
# allocated (float32 masters, gradients and Adam moments of the 4.8B-parameter proxy), under the
# H100's 79.2 GiB; expandable segments keep the allocator's reserve near that (no numerical
# effect). The BF16 run it is compared with is the sixteenth round's (H200): the same sm_90
# kernels run on both GPUs.
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $OUT/suite.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site output/fp8/whl/*.whl || exit 1
tar -C / -xzf output/fp8/data.tgz
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import torch; p=torch.cuda.get_device_properties(0); print(p.name, round(p.total_memory/2**30, 2), 'GiB')" | tee -a $OUT/suite.log
echo "=== parity fp8 only $(date -u +%H:%M:%S)" | tee -a $OUT/suite.log
PYTHONPATH=/tmp/site:$PWD/src timeout ${LEFT:-520} python3 benchmarks/fp8_loss_parity.py --blend /tmp/fp8prep/output/nano3/stage0_pretrain_tiny/blend.json --recipes tensorwise --steps 300 --seq 2048 --experts-gather --experts-wgrad --experts-gemm cutlass --eval-batches 16 --no-bf16 --seeds 3 --out $OUT/fp8only_seeds_3_h100_$(date -u +%H%M).json 2>&1 | grep -v "SyntaxWarning\|Configuration class for" | tee $OUT/parity_fp8only_h100.log | grep -v "step [0-9]*:" | tail -20
grep "step \(1\|51\|101\|151\|201\|251\|300\):" $OUT/parity_fp8only_h100.log | tee -a $OUT/suite.log
echo "=== done $(date -u +%H:%M:%S), ${SECONDS} s" | tee -a $OUT/suite.log
