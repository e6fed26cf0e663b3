# Sourced by the run_on_cuda*.sh scripts on a lent GPU machine (no network there): installs the Torch-Pruning
# wheel from .whl/, puts the Debian package's Fashion-MNIST files from .fmnist/ where the loaders look, and prints
# the GPU and library versions. DEV=cpu (a local dry run) skips the install and the copy.
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "${DEV:-cuda}" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
  nvidia-smi -L
fi
$PY -c "import torch, torchvision, onnxruntime; print(torch.__version__, torchvision.__version__, onnxruntime.__version__)"
