#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one go, on one H200 (the session device tool's
# image: torch/triton/transformers preinstalled; omegaconf carried as wheels in .whl/).
# Usage: bash benchmarks/h200_suite.sh STAGE... (stages: blocks, <train|peer>-<fp32|bf16>[-mbN]
# [-accumN][-prof][-rec][-ovl] (peer: also the transformers peer; ovl: MoE shared-expert overlap), numerics-<fp32|bf16>, long,
# blocks-<kinds>, gpu-tests); results and logs go to $OUT (default
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
        esac
      done
      if [ "$kind" = peer ]; then
        [[ " ${extra[*]} " == *" --grad-accum "* ]] || extra+=(--grad-accum 4 --steps 5)
        extra+=(--peer hf --peer-steps "${PEER_STEPS:-2}"); limit=420
      else limit=240; fi
      timeout $limit $TT "${extra[@]}" "${prof[@]}" --out $OUT/$stage.json --append-row $OUT/rows.md ;;
    numerics-*) timeout 200 $TT --params "${stage#numerics-}" --steps 0 --warmup 0 --no-profile --check-numerics 3 --out $OUT/$stage.json ;;
    long)       timeout 300 python3 benchmarks/long_context.py --seqs "${LONG_SEQS:-32768,65536,131072,262144}" --steps "${LONG_STEPS:-2}" --out $OUT/long.json --append-row $OUT/rows.md ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "=== $stage rc=$?"
done
