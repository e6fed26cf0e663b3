#!/usr/bin/env bash
# Fourth CUDA session (an H200): PART=select (default) redoes the recipe choice on half of the test split (half A)
# and reports on the other half (half B) with fresh seeds; PART=check_resnet18 runs the chosen learning rate
# against the old default on the resnet18; PART=auto_lr runs --lr auto on ResNet-20 and the resnet18 (seeds 2-3).
# Same layout as run_on_cuda.sh: .whl/ and .fmnist/ beside the working tree, $OUT for what comes back. The
# resnet18 parts read .r18/resnet18_fashion_mnist_64.safetensors: benchmarks/cache's checkpoint with its weights
# rounded to float16, so that it fits the 64 MiB a device call carries (made with safetensors' load_file /
# save_file, keeping the metadata). DEV=cpu LIMIT=600 makes a local dry run.
set -u
DEV=${DEV:-cuda}
LIM=${LIMIT:+--limit $LIMIT}
source benchmarks/cuda_env.sh
R18=.r18/resnet18_fashion_mnist_64.safetensors
AUTO='{"criterion": "l1", "lr": 0, "alpha": 0.5}'
case "${PART:-select}" in
  select)
    $PY benchmarks/bench_prune_recipe.py --part select --device "$DEV" $LIM --select-deadline-s "${SELECT_S:-300}" \
        --deadline-s "${DEADLINE_S:-480}" 2>&1 | tee "$OUT/log.txt"
    cp benchmarks/results/prune_recipe_select.json "$OUT/" ;;
  check_resnet18)
    $PY benchmarks/bench_prune_recipe.py --part final --device "$DEV" $LIM --model "$R18" --seeds 2 --seed-start 2 \
        --recipe '{"criterion": "l1", "lr": 0.06, "alpha": 0.5, "ema": 0.995}' \
        --baseline '{"criterion": "l1", "lr": 0.01, "alpha": 0.5}' --name prune_recipe_check_resnet18 \
        --deadline-s 170 2>&1 | tail -20
    cp benchmarks/results/prune_recipe_check_resnet18.json "$OUT/" ;;
  auto_lr)
    $PY benchmarks/bench_prune_recipe.py --part final --device "$DEV" $LIM --seeds 2 --seed-start 2 --recipe "$AUTO" \
        --baseline "$AUTO" --name prune_recipe_auto_lr_resnet20 --deadline-s 60 2>&1 | grep final
    $PY benchmarks/bench_prune_recipe.py --part final --device "$DEV" $LIM --model "$R18" --seeds 2 --seed-start 2 \
        --recipe "$AUTO" --baseline "$AUTO" --name prune_recipe_auto_lr_resnet18 --deadline-s 75 2>&1 | grep final
    cp benchmarks/results/prune_recipe_auto_lr_*.json "$OUT/" ;;
  *) echo "PART must be select, check_resnet18 or auto_lr" >&2; exit 2 ;;
esac
