#!/usr/bin/env bash
# Second CUDA call: the CUDA tests after the TF32 fix (full output), and seeds 3-5 of the ResNet-20 final rows.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
{
  python3 -m pytest -q -p no:cacheprovider -m needs_cuda tests/ -rA 2>&1 | tail -30
  python3 benchmarks/bench_prune_recipe.py --part final --device cuda --seeds 3 --seed-start 3 \
      --name prune_recipe_final_seeds3to5 --deadline-s 110
} 2>&1 | tee "$OUT/log.txt"
cp benchmarks/results/prune_recipe_final_seeds3to5.json "$OUT/"
