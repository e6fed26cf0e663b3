#!/usr/bin/env bash
# Third CUDA call: the CUDA tests (layer reconstruction included), the prune CLI on CUDA with --reconstruct,
# stage D of the recipe search (layer reconstruction, on the held-out split) and the final test-set rows of its
# choice against the search's earlier choice (6 seeds). Same layout as run_on_cuda.sh: .whl/ and .fmnist/
# beside the working tree, $OUT for what comes back. DEV=cpu LIMIT=600 BUDGET=120 make a local dry run.
set -u
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
DEV=${DEV:-cuda}
LIM=${LIMIT:+--limit $LIMIT}
BUDGET=${BUDGET:-540}   # seconds after which no new fine-tuning run starts
source benchmarks/cuda_env.sh
{
  $PY -m pytest -q -p no:cacheprovider -m needs_cuda tests/ -rA 2>&1 | tail -12
  $PY -m rescompress prune rescompress/assets/resnet20_fashion_mnist.safetensors --target-macs 0.4 --criterion l2 \
      --finetune-data rescompress/assets/fashion_mnist_train_slice.npz --epochs 1 --reconstruct 512 \
      --eval-data rescompress/assets/fashion_mnist_test_slice.npz --device "$DEV" --no-latency \
      -o "$OUT/r20_recon.safetensors" --json > "$OUT/cli_prune.json"; echo "cli exit $?"
  $PY benchmarks/bench_prune_recipe.py --part reconstruct --device "$DEV" $LIM --deadline-s "$(left $((BUDGET / 2)))"
  CHOSEN=$($PY -c "import json; d=json.load(open('benchmarks/results/prune_recipe_reconstruct.json')); \
print(json.dumps(next(r for r in d['runs'] if r.get('stage') == 'chosen')['recipe']))")
  echo "chosen: $CHOSEN"
  $PY benchmarks/bench_prune_recipe.py --part final --device "$DEV" $LIM --seeds 6 --recipe "$CHOSEN" \
      --baseline '{"criterion": "l2", "lr": 0.03, "alpha": 0.9}' --name prune_recipe_reconstruct_final \
      --deadline-s "$(left "$BUDGET")"
} 2>&1 | tee "$OUT/log.txt"
cp benchmarks/results/prune_recipe_reconstruct*.json "$OUT/"
rm -f "$OUT/r20_recon.safetensors"
ls -la "$OUT"
