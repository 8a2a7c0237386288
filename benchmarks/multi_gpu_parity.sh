python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
A="nano3 pretrain -c tiny train.train_iters=5 data.mock=true train.global_batch_size=16 train.micro_batch_size=8 train.eval_interval=1000 checkpoint.save_interval=100000"
python3 -m nemotron.cli.main $A --job-dir $OUT/g1 2>&1 | tail -4
torchrun --nproc-per-node 2 -m nemotron.cli.main $A --job-dir $OUT/dp2 2>&1 | tail -4
torchrun --nproc-per-node 2 -m nemotron.cli.main $A model.expert_model_parallel_size=2 --job-dir $OUT/ep2 2>&1 | tail -4
torchrun --nproc-per-node 2 -m nemotron.cli.main $A model.expert_model_parallel_size=2 model.tensor_model_parallel_size=2 model.sequence_parallel=true --job-dir $OUT/tp2ep2 2>&1 | tail -4
for d in g1 dp2 ep2 tp2ep2; do echo "== $d"; python3 -c "
import json,sys
for l in open('$OUT/$d/metrics.jsonl'):
    x=json.loads(l)
    if x.get('kind')=='train': print(x['step'], '%.6f'%x['loss'], x.get('memory_gb'))
" 2>&1 | tail -5; done
