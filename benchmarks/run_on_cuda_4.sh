#!/usr/bin/env bash
# Fourth CUDA call: the recipe choice redone on half of the test split (half A) and reported on the other half
# (half B) with fresh seeds (bench_prune_recipe.py --part select). Same layout as run_on_cuda.sh: .whl/ and
# .fmnist/ beside the working tree, $OUT for what comes back. DEV=cpu LIMIT=600 makes a local dry run.
set -u
export PYTHONUNBUFFERED=1
DEV=${DEV:-cuda}
LIM=${LIMIT:+--limit $LIMIT}
if [ "$DEV" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
  nvidia-smi -L
fi
PY=${PY:-python3}
$PY -c "import torch, torchvision, onnxruntime; print(torch.__version__, torchvision.__version__, onnxruntime.__version__)"
$PY benchmarks/bench_prune_recipe.py --part select --device "$DEV" $LIM --select-deadline-s "${SELECT_S:-300}" \
    --deadline-s "${DEADLINE_S:-480}" 2>&1 | tee "$OUT/log.txt"
cp benchmarks/results/prune_recipe_select.json "$OUT/"
