#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one go, on one H200 (the session device tool's
# image: torch/triton/transformers preinstalled; omegaconf carried as wheels in .whl/).
# Usage: bash benchmarks/h200_suite.sh STAGE... (stages: blocks, <train|peer>-<fp32|bf16>[-mbN]
# [-accumN][-prof][-rec][-ovl][-f32g][-fp8t|-fp8r|-fp8g][-reuse][-ag][-xg][-xw][-xt][-exact][-at][-lmrowsN] (peer: also the transformers peer; ovl: MoE
# shared-expert overlap; fp8t/r/g: train.fp8 with the tensorwise / rowwise / rowwise_with_gw_hp recipe;
# reuse: train.fp8.reuse_weights=true; ag: train.fp8.fsdp_float8_all_gather=true; xg: train.fp8.experts_fsdp_float8_all_gather=true; xw: train.fp8.experts_weight_grad=fp8; xt: train.fp8.experts_grouped_gemm=triton, with XT_TILES="M,N,K,stages,warps,tma,persistent" its train.fp8.experts_grouped_tiles (default: the kernel's); exact: train.fp8.fast_accum=false; at: train.fp8.autotune_casts=true; lmrowsN: train.fp8.lm_head_group_rows=N), numerics-<fp32|bf16>, long,
# blocks-<kinds>, blocks-fp8, gpu-tests, grad-audit, dynamics (DYN_BLEND=blend.json), fp8-tests, fp8-parity
# (FP8_BLEND=blend.json, FP8_RECIPES, FP8_EXPERTS_GATHER=1: train.fp8.experts_fsdp_float8_all_gather, FP8_EXPERTS_WGRAD=1: train.fp8.experts_weight_grad=fp8, FP8_AUTOTUNE_CASTS=1: train.fp8.autotune_casts=true, FP8_LAYERS a comma list of train.fp8.layers for the fp8 stages: train-*
# default to train.fp8's (dense), blocks-fp8 and fp8-parity to all));
# FP8 needs torchao (carried as a wheel like omegaconf); results and logs go to $OUT (default
# ./bench_out).
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if ! python3 -c "import omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
TT="python3 benchmarks/train_throughput.py"
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    blocks)     timeout 300 python3 benchmarks/blocks.py --profile --profile-top ${PROFILE_TOP:-15} --out $OUT/blocks.json --append-row $OUT/rows.md ;;
    blocks-*)   timeout 300 python3 benchmarks/blocks.py --profile --profile-top ${PROFILE_TOP:-15} --blocks "${stage#blocks-}" --out $OUT/blocks.json --append-row $OUT/rows.md ;;
    gpu-tests)  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_kernels.py tests/models/test_gpu.py tests/distributed/test_fsdp_lifetime.py tests/train/test_gpu_pretrain.py tests/distributed/test_gpu_context_parallel.py tests/distributed/test_gpu_expert_parallel.py ;;
    train-*|peer-*)
      # <train|peer>-<fp32|bf16>[-mb<N>][-accum<N>][-prof][-rec][-ovl]: one proxy run (peer: + the HF peer)
      IFS=- read -r kind params rest <<< "$stage"
      extra=(--params "$params"); prof=(--no-profile)
      for opt in ${rest//-/ }; do
        case $opt in
          mb*) extra+=(--micro-batch "${opt#mb}") ;;
          accum*) extra+=(--grad-accum "${opt#accum}" --steps 5) ;;
          prof) prof=() ;;
          rec) extra+=(--recompute) ;;
          ovl) extra+=(--shared-expert-overlap) ;;
          f32g) extra+=(--experts-float32-grads) ;;
          fp8t) extra+=(--fp8 tensorwise ${FP8_LAYERS:+--fp8-layers $FP8_LAYERS}) ;;
          fp8r) extra+=(--fp8 rowwise ${FP8_LAYERS:+--fp8-layers $FP8_LAYERS}) ;;
          fp8g) extra+=(--fp8 rowwise_with_gw_hp ${FP8_LAYERS:+--fp8-layers $FP8_LAYERS}) ;;
          reuse) extra+=(--fp8-reuse) ;;
          ag) extra+=(--fp8-all-gather) ;;
          xg) extra+=(--fp8-experts-gather) ;;
          xw) extra+=(--fp8-experts-wgrad) ;;
          xt) extra+=(--fp8-experts-gemm triton ${XT_TILES:+--fp8-experts-tiles $XT_TILES}) ;;
          exact) extra+=(--fp8-exact-accum) ;;
          at) extra+=(--fp8-autotune-casts) ;;
          lmrows*) extra+=(--fp8-lm-head-group-rows "${opt#lmrows}") ;;
        esac
      done
      if [ "$kind" = peer ]; then
        [[ " ${extra[*]} " == *" --grad-accum "* ]] || extra+=(--grad-accum 4 --steps 5)
        extra+=(--peer hf --peer-steps "${PEER_STEPS:-2}"); limit=420
      else limit=${TRAIN_LIMIT:-240}; fi
      timeout $limit $TT "${extra[@]}" "${prof[@]}" --out $OUT/$stage.json --append-row $OUT/rows.md ;;
    grad-audit) timeout 300 python3 benchmarks/grad_audit.py --seqs "${AUDIT_SEQS:-4096,8192}" --batches "${AUDIT_BATCHES:-1,2}" --out $OUT/grad_audit.json ;;
    dynamics)
      # DYN_BLEND: a prepared blend.json (nemotron nano3 data prep pretrain -c tiny); the three
      # paths run side by side on the GPU (their losses do not depend on timing), then compared.
      for p in fast reference reference-fp32; do
        timeout 420 python3 benchmarks/train_dynamics.py --blend "$DYN_BLEND" --path $p --steps "${DYN_STEPS:-200}" --out $OUT/dyn_$p.json > $OUT/dyn_$p.log 2>&1 &
      done; wait
      tail -n 2 $OUT/dyn_*.log
      python3 benchmarks/train_dynamics.py --compare $OUT/dyn_*.json --out $OUT/dyn_compare.json ;;
    blocks-fp8) timeout 300 python3 benchmarks/blocks.py --profile --profile-top ${PROFILE_TOP:-15} --paths fast,fast-overlap --fp8 ${FP8_RECIPES:-tensorwise,rowwise} ${FP8_LAYERS:+--fp8-layers $FP8_LAYERS} --warmup 2 --iters 5 --out $OUT/blocks-fp8.json --append-row $OUT/rows.md ;;
    fp8-tests)  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu_fp8.py tests/train/test_fp8.py ;;
    fp8-parity) timeout 400 python3 benchmarks/fp8_loss_parity.py --blend "$FP8_BLEND" --recipes ${FP8_RECIPES:-tensorwise} --steps ${PARITY_STEPS:-300} --seq 2048 ${FP8_LAYERS:+--fp8-layers $FP8_LAYERS} ${FP8_EXPERTS_GATHER:+--experts-gather} ${FP8_EXPERTS_WGRAD:+--experts-wgrad} ${FP8_AUTOTUNE_CASTS:+--autotune-casts} --out $OUT/fp8-parity.json ;;
    numerics-*) timeout 200 $TT --params "${stage#numerics-}" --steps 0 --warmup 0 --no-profile --check-numerics 3 --out $OUT/$stage.json ;;
    long)       timeout 300 python3 benchmarks/long_context.py --seqs "${LONG_SEQS:-32768,65536,131072,262144}" --steps "${LONG_STEPS:-2}" --out $OUT/long.json --append-row $OUT/rows.md ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "=== $stage rc=$?"
done
