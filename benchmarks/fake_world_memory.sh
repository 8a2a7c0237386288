#!/usr/bin/env bash
# Issue 21: real peak memory of multi-GPU layouts of the whole Nano3 on ONE GPU: rank 0 of a
# fake process group of W ranks (collectives do nothing; every shard and buffer is allocated as
# on the cluster). Compares with the performance model (`nemotron nano3 plan`). FSDP layouts
# only (the EP all-to-all needs real peers). Run on the device machine (one H200) from the repo
# root with .whl carried, like multi_gpu_proxy.sh. ~1-2 min per run.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi -L
RUNS=${RUNS:-/tmp/fake_world_runs}; mkdir -p $RUNS
FULL52="model.num_experts=128 data.mock=true train.train_tokens=null train.train_iters=3
  model.tensor_model_parallel_size=1 model.expert_model_parallel_size=1 model.sequence_parallel=false
  logger.progress_bar=false train.micro_batch_size=1"
one() {
  name=$1; world=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name (fake world $world)"
  timeout ${RUN_TIMEOUT:-300} python3 benchmarks/multi_gpu.py --fake-world $world --name $name --out $RUNS $FULL52 "$@" \
    > $RUNS/$name.log 2>&1; echo "rc=$?"; tail -n 4 $RUNS/$name.log
  { echo "===== $name"; cat $RUNS/$name.log; } >> $OUT/logs.txt
  [ -f $RUNS/$name.json ] && python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" $RUNS/$name.json >> $OUT/results.jsonl
}
# DP8, one micro-batch per step (reshard after forward), with and without recompute
one full52_dp8 8 train.global_batch_size=8
one full52_dp8_rc 8 train.global_batch_size=8 train.activation_recompute=true
# DP8 with 4 micro-batches per step, resharding every micro-batch (sharded grads accumulate)
one full52_dp8_acc_reshard_rc 8 train.global_batch_size=32 train.fsdp_accumulate_unsharded=false train.activation_recompute=true
# DP16: the 16-GPU (two-node) FSDP layout
one full52_dp16_rc 16 train.global_batch_size=16 train.activation_recompute=true
# each JSON line holds the plan's prediction for its layout ("predicted")
