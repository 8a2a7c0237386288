#!/usr/bin/env bash
# Issue 10: the Nano3 proxy (first 14 blocks, 64 experts, vocab 131072, seq 8192) on 1 and 2 GPUs
# of one host, loss parity and tokens/s per GPU per layout (DP, EP, TP+SP, CP), then full-width
# (128 expert) blocks.
# Run on the device machine (nvidia-h200-x2) from the repo root with .whl carried (omegaconf).
# A failed run does not stop the rest.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
N=${NGPU:-2}
STEPS=${STEPS:-6}
P="model.hybrid_pattern=MEMEM*EMEMEM*E model.num_layers=14 model.num_experts=64 data.mock=true
   train.train_tokens=null train.train_iters=$STEPS train.global_batch_size=$N train.micro_batch_size=1
   scheduler.warmup_tokens=16384 model.tensor_model_parallel_size=1 model.expert_model_parallel_size=1
   model.sequence_parallel=false logger.progress_bar=false"
# Per-run JSON and logs go to $RUNS; $OUT gets two files (the device tool returns at most 8):
# results.jsonl (one line per finished run) and logs.txt (every run's full output).
RUNS=${RUNS:-/tmp/multi_gpu_runs}; mkdir -p $RUNS
# ONLY="g1 dp2 ..." runs just those names (one device call may not hold every run).
one() {
  name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name"
  timeout ${RUN_TIMEOUT:-240} "$@" --name $name --out $RUNS > $RUNS/$name.log 2>&1
  echo "rc=$?"; grep '^{' $RUNS/$name.log || tail -n 15 $RUNS/$name.log
  { echo "===== $name"; cat $RUNS/$name.log; } >> $OUT/logs.txt
  [ -f $RUNS/$name.json ] && python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" $RUNS/$name.json >> $OUT/results.jsonl
}
one g1 python3 benchmarks/multi_gpu.py $P
# the same bf16 compute weights (FSDP2, one-rank mesh) as the multi-GPU runs use
one g1_bf16 python3 benchmarks/multi_gpu.py $P train.compute_weights=bf16
one dp$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P
# the MoE shared expert on a side stream under FSDP2 across ranks: losses must match dp$N's
one dp${N}_overlap torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P train.moe_shared_expert_overlap=true
one dp${N}ep$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.expert_model_parallel_size=$N
one tp${N}sp_ep$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.tensor_model_parallel_size=$N \
  model.sequence_parallel=true model.expert_model_parallel_size=$N
one cp$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.context_parallel_size=$N
# Full width: 128 routed experts, the first 14 and then 20 blocks of the Nano3 pattern, FSDP x EP.
one full14_ep$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.num_experts=128 \
  model.expert_model_parallel_size=$N
one full20_ep$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.num_experts=128 \
  model.expert_model_parallel_size=$N 'model.hybrid_pattern=MEMEM*EMEMEM*EMEMEM*' model.num_layers=20
# Throughput at a production-like batch: micro batch 2 x 4 accumulation steps per GPU, bf16
# compute weights (what `compute_weights=auto` picks on CUDA with accumulation), the shared
# expert on a side stream; the one-GPU run has the same per-GPU work.
ACC="train.micro_batch_size=2 train.moe_shared_expert_overlap=true"
one g1_acc python3 benchmarks/multi_gpu.py $P $ACC train.global_batch_size=8
one dp${N}_acc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $ACC train.global_batch_size=$((8 * N))
one dp${N}ep${N}_acc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $ACC \
  train.global_batch_size=$((8 * N)) model.expert_model_parallel_size=$N
one full14_ep${N}_acc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $ACC \
  train.global_batch_size=$((8 * N)) model.num_experts=128 model.expert_model_parallel_size=$N
# full width without expert parallelism (FSDP2 shards the experts), and the most blocks that fit
one full14_dp${N}_acc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $ACC \
  train.global_batch_size=$((8 * N)) model.num_experts=128
one full27_ep$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.num_experts=128 \
  model.expert_model_parallel_size=$N 'model.hybrid_pattern=MEMEM*EMEMEM*EMEMEM*EMEMEM*' model.num_layers=27
# the whole Nano3 (52 blocks, 31.6B parameters) where N GPUs hold it
one full52_ep$N torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.num_experts=128 \
  model.expert_model_parallel_size=$N 'model.hybrid_pattern=MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME' \
  model.num_layers=52

# ---- issue 21: expert-parallel overlap A/B, the whole model (run with RUN_TIMEOUT=600) ----
# The same EP run with the shared expert on the same stream as the exchange ("sync"): compare
# with dp${N}ep${N}_acc (the overlap, on by default since issue 21) and dp${N}_acc (no EP).
one dp${N}ep${N}_acc_sync torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $ACC \
  train.global_batch_size=$((8 * N)) model.expert_model_parallel_size=$N train.moe_shared_expert_overlap=false
# One full-width MoE layer: local vs EP sync vs EP overlap, per-GPU ms and bit-equality
if [ -z "$ONLY" ] || [[ " $ONLY " == *" ep_overlap "* ]]; then
  for MB in 1 2; do
    echo "== ep_overlap mb$MB"
    torchrun --nproc-per-node $N benchmarks/ep_overlap.py --micro-batch $MB --out $RUNS/ep_overlap_mb$MB.json \
      > $RUNS/ep_overlap_mb$MB.log 2>&1; echo "rc=$?"; tail -n 3 $RUNS/ep_overlap_mb$MB.log
    { echo "===== ep_overlap_mb$MB"; cat $RUNS/ep_overlap_mb$MB.log; } >> $OUT/logs.txt
    [ -f $RUNS/ep_overlap_mb$MB.json ] && python3 -c "import json,sys; print(json.dumps(dict(json.load(open(sys.argv[1])), name='ep_overlap_mb$MB')))" $RUNS/ep_overlap_mb$MB.json >> $OUT/results.jsonl
  done
fi
# TP + SP without EP (calibrates the TP cost alone; the plan extrapolates TP > 2 from these)
one tp${N}sp torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P model.tensor_model_parallel_size=$N \
  model.sequence_parallel=true
one tp${N}sp_acc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $ACC train.global_batch_size=8 \
  model.tensor_model_parallel_size=$N model.sequence_parallel=true
# NCCL bus bandwidth per collective and size (replaces the plan's assumed bandwidths)
if [ -z "$ONLY" ] || [[ " $ONLY " == *" nccl "* ]]; then
  echo "== nccl bandwidth"
  torchrun --nproc-per-node $N benchmarks/nccl_bandwidth.py --out $RUNS/nccl$N.json > $RUNS/nccl.log 2>&1
  echo "rc=$?"; cat $RUNS/nccl.log | grep '^{' ; { echo "===== nccl"; cat $RUNS/nccl.log; } >> $OUT/logs.txt
  [ -f $RUNS/nccl$N.json ] && python3 -c "import json,sys; print(json.dumps(dict(json.load(open(sys.argv[1])), name='nccl$N')))" $RUNS/nccl$N.json >> $OUT/results.jsonl
fi
FULL52="model.num_experts=128 model.hybrid_pattern=MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME model.num_layers=52"
# The whole Nano3 (31.6B parameters). `nemotron nano3 plan -g 4 -g 8` predicts, per GPU:
#  4 GPUs EP4 mb1 + recompute (global batch 4): 122.3 GiB (fits, tight); without recompute
#    133.1 GiB: over the 125.8 usable, the likely cause of the 4-GPU stall (an OOM on one rank
#    whose NCCL teardown waited for its peers; launcher_process_group no longer waits);
#  8 GPUs EP8 mb1 (global batch 8): 88.6 GiB; with 8 micro-batches per GPU 118.5 GiB.
# Each run prints "[t s] start" (model built, sharded, initialised) and "[t s] train step=1"
# (time to first step) as it goes, so a run cut off by the limit shows how far it got.
one full52_ep${N}_rc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $FULL52 \
  model.expert_model_parallel_size=$N train.activation_recompute=true
one full52_ep${N} torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $FULL52 \
  model.expert_model_parallel_size=$N
one full52_ep${N}_acc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $FULL52 \
  model.expert_model_parallel_size=$N train.global_batch_size=$((8 * N))
one full52_ep${N}_acc_rc torchrun --nproc-per-node $N benchmarks/multi_gpu.py $P $FULL52 \
  model.expert_model_parallel_size=$N train.global_batch_size=$((8 * N)) train.activation_recompute=true
