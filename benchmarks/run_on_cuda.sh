#!/usr/bin/env bash
# The CUDA session behind the GPU-made results (one rented H100/H200 machine, no network there).
# Expects, beside the working tree: .whl/ (torch_pruning wheel) and .fmnist/ (the Debian package's four
# Fashion-MNIST .gz files), and $OUT for what comes back. Each step writes as it goes; a later step's
# failure keeps the earlier ones.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
nvidia-smi -L; python3 -c "import torch, torchvision, onnxruntime; print(torch.__version__, torchvision.__version__, onnxruntime.__version__)"
{
  python3 -m pytest -q -p no:cacheprovider -m needs_cuda tests/ 2>&1 | tail -5
  python3 benchmarks/train_reference.py --arch resnet18 --size 64 --channels 3 --device cuda --threads 8 \
      --out benchmarks/cache/resnet18_fashion_mnist_64.safetensors
  python3 benchmarks/bench_prune_recipe.py --part search final --device cuda --deadline-s "$(left 400)"
  python3 benchmarks/bench_prune_recipe.py --part rows --device cuda --deadline-s "$(left 500)" \
      --model benchmarks/cache/resnet18_fashion_mnist_64.safetensors
} 2>&1 | tee "$OUT/log.txt"
split -b 15M -d benchmarks/cache/resnet18_fashion_mnist_64.safetensors "$OUT/resnet18_64.part"
tar czf "$OUT/results.tgz" benchmarks/results/*.json
ls -la "$OUT"
