#!/usr/bin/env bash
# Fifth CUDA session (an H100 or H200, 15 minutes of device time): the tests marked needs_cuda; the prune command
# itself with --lr auto on CUDA (ResNet-20, 40% of the MACs, full Fashion-MNIST splits); and whether the current
# layer reconstruction helps before one epoch of --lr auto fine-tuning (fresh seeds 8-13 on ResNet-20, 8-11 on the
# CPU-trained resnet18, its weights rounded to float16 to fit the transfer: .r18/). Same layout as run_on_cuda.sh.
# DEV=cpu LIMIT=600 makes a local dry run.
set -u
DEV=${DEV:-cuda}
LIM=${LIMIT:+--limit $LIMIT}
source benchmarks/cuda_env.sh
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
R18=.r18/resnet18_fashion_mnist_64_cpu.safetensors
AUTO='{"criterion": "l1", "lr": 0, "alpha": 0.5}'
REC='{"criterion": "l1", "lr": 0, "alpha": 0.5, "reconstruct": 512}'
{
  [ "$DEV" = cuda ] && $PY -m pytest -q -p no:cacheprovider -m needs_cuda tests/ 2>&1 | tail -4
  T1=$(date +%s); $PY -m rescompress prune rescompress/assets/resnet20_fashion_mnist.safetensors --target-macs 0.4 \
      --finetune-data /usr/share/datasets/fashion-mnist --eval-data /usr/share/datasets/fashion-mnist $LIM \
      --device "$DEV" -o /tmp/r20.pruned.safetensors --json > "$OUT/prune_cli_cuda.json" 2> "$OUT/prune_cli_cuda.err"
  echo "prune exit $? after $(( $(date +%s) - T1 )) s"; tail -3 "$OUT/prune_cli_cuda.err"
  $PY benchmarks/bench_prune_recipe.py --part final --device "$DEV" $LIM --seeds 6 --seed-start 8 --recipe "$REC" \
      --baseline "$AUTO" --name prune_recipe_reconstruct_auto_resnet20 --deadline-s "$(left 330)" 2>&1 | grep -E "final|Error"
  $PY benchmarks/bench_prune_recipe.py --part final --device "$DEV" $LIM --model "$R18" --seeds 4 --seed-start 8 \
      --recipe "$REC" --baseline "$AUTO" --name prune_recipe_reconstruct_auto_resnet18 --deadline-s "$(left 450)" \
      2>&1 | grep -E "final|Error"
} 2>&1 | tee "$OUT/log.txt"
cp benchmarks/results/prune_recipe_reconstruct_auto_*.json "$OUT/"
