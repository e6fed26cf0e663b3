"""Runners: torch and ONNX Runtime agree on real exported ResNets; session options are really set."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from rescompress.checkpoint import CheckpointHeader, save_checkpoint
from rescompress.errors import RescompressError
from rescompress.export import export_onnx
from rescompress.models import build_model
from rescompress.runtimes import (
    RUNTIMES,
    Runner,
    RunnerInfo,
    classifier_outputs,
    make_runner,
    ort_session_options,
    resolve_runtime,
    runner_info,
)
from rescompress.runtimes.onnxruntime_runner import SPIN_INTER, SPIN_INTRA
from rescompress.spec import Preprocess, get_preset

# FP32 ONNX Runtime vs torch: different kernels and summation order, same math. 1e-4 relative
# (plus 1e-5 absolute for logits near zero) is far below anything a real difference would cause.
RTOL, ATOL = 1e-4, 1e-5


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics/affine so that folding and export are really exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def resnet20_onnx(tmp_path_factory):
    model = _randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    path = tmp_path_factory.mktemp("rt") / "resnet20.onnx"
    export_onnx(model, get_preset("fashion-mnist"), path, arch="resnet20", num_classes=10)
    return model, path


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    model = _randomize_bn(build_model("resnet18", num_classes=7, in_channels=3))
    pre = Preprocess("custom", (32, 32), 3, (0.5,), (0.25,))
    path = tmp_path_factory.mktemp("rt") / "resnet18.onnx"
    export_onnx(model, pre, path, arch="resnet18", num_classes=7)
    return model, path


def test_torch_and_onnxruntime_agree_on_resnet20(resnet20_onnx):
    model, path = resnet20_onnx
    torch_runner = make_runner(model, threads=1)
    ort_runner = make_runner(path, threads=1)
    assert isinstance(torch_runner, Runner) and isinstance(ort_runner, Runner)
    assert (torch_runner.name, ort_runner.name) == ("torch", "onnxruntime")
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28), dtype=np.float32)
    a, b = torch_runner.run(x), ort_runner.run(x)
    assert a.shape == b.shape == (2, 10) and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    assert (a.argmax(1) == b.argmax(1)).all()
    # The ONNX runner's metadata comes from the file: classes, channels, fixed size, preprocessing.
    info = ort_runner.info
    assert (info.num_classes, info.in_channels, info.arch) == (10, 1, "resnet20")
    assert info.input_size == (28, 28)
    assert info.preprocess == get_preset("fashion-mnist")
    assert info.input_shape(4) == (4, 1, 28, 28)
    # The torch runner reads classes and channels from the module itself.
    assert (torch_runner.info.num_classes, torch_runner.info.in_channels) == (10, 1)


def test_torch_and_onnxruntime_agree_on_resnet18_dynamic_batch(resnet18_onnx):
    model, path = resnet18_onnx
    torch_runner, ort_runner = make_runner(model), make_runner(path, runtime="onnxruntime", threads=2)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 3, 32, 32), dtype=np.float32)
        a, b = torch_runner.run(x), ort_runner.run(x)
        assert b.shape == (n, 7)
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    assert ort_runner.info.preprocess.size == (32, 32) and ort_runner.info.num_classes == 7


def test_session_options_spinning_off_by_default_and_threads():
    so = ort_session_options()
    assert so.get_session_config_entry(SPIN_INTRA) == "0"
    assert so.get_session_config_entry(SPIN_INTER) == "0"
    so_on = ort_session_options(threads=3, spinning=True)
    assert so_on.get_session_config_entry(SPIN_INTRA) == "1"
    assert so_on.get_session_config_entry(SPIN_INTER) == "1"
    assert so_on.intra_op_num_threads == 3
    import onnxruntime as ort

    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_runner_session_really_has_spinning_off(resnet20_onnx, tmp_path):
    _, path = resnet20_onnx
    optimized = tmp_path / "optimized.onnx"
    runner = make_runner(path, threads=1, optimized_model_path=optimized)
    opts = runner.session.get_session_options()
    assert opts.get_session_config_entry(SPIN_INTRA) == "0"
    assert opts.get_session_config_entry(SPIN_INTER) == "0"
    assert opts.intra_op_num_threads == 1
    assert runner.info.settings["intra_op_spinning"] is False
    # ORT wrote the graph after its fusions: still 21 convolutions (as Conv or FusedConv), no BN.
    graph = onnx.load(str(optimized)).graph
    ops = [n.op_type for n in graph.node]
    assert sum(op in ("Conv", "FusedConv") for op in ops) == 21
    assert "BatchNormalization" not in ops


def test_torch_runner_from_checkpoint_file_uses_load_model(tmp_path):
    model = _randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, CheckpointHeader("resnet20", 10, 1, get_preset("fashion-mnist")))
    runner = make_runner(path)
    assert runner.name == "torch"
    assert (runner.info.arch, runner.info.num_classes, runner.info.in_channels) == ("resnet20", 10, 1)
    assert runner.info.preprocess == get_preset("fashion-mnist")
    x = np.random.default_rng(3).standard_normal((2, 1, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run(x), expected, rtol=1e-5, atol=1e-6)


def test_torch_threads_only_set_when_given():
    before = torch.get_num_threads()
    try:
        make_runner(build_model("resnet20", 10, 1))
        assert torch.get_num_threads() == before
        make_runner(build_model("resnet20", 10, 1), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resolve_runtime_and_table(tmp_path):
    assert resolve_runtime(tmp_path / "m.onnx") == "onnxruntime"
    assert resolve_runtime(tmp_path / "m.pt") == "torch"
    assert resolve_runtime(tmp_path / "m.safetensors") == "torch"
    assert resolve_runtime(build_model("resnet20", 10, 1)) == "torch"
    assert resolve_runtime(tmp_path / "m.onnx", "openvino") == "openvino"
    with pytest.raises(RescompressError, match="unknown runtime 'tflite'"):
        resolve_runtime(tmp_path / "m.onnx", "tflite")
    # Every entry of the table names an importable factory.
    for name, target in RUNTIMES.items():
        module_name, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module_name), attr)), name


def test_wrong_model_for_runtime_is_a_clear_error(resnet20_onnx, tmp_path):
    model, path = resnet20_onnx
    with pytest.raises(RescompressError, match="ONNX file"):
        make_runner(path, runtime="torch")
    with pytest.raises(RescompressError, match=r"\.onnx file"):
        make_runner(model, runtime="onnxruntime")
    with pytest.raises(RescompressError, match="does not exist"):
        make_runner(tmp_path / "missing.onnx")
    with pytest.raises(RescompressError, match="threads"):
        make_runner(model, threads=0)


def test_onnx_that_is_not_a_classifier_is_refused(tmp_path):
    # A real graph that maps an image to an image (Relu), not to (N, classes) logits.
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["out"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(RescompressError, match="not an image classifier"):
        make_runner(path)


def test_classifier_outputs_and_runner_info_fallback():
    with pytest.raises(RescompressError, match="not a classifier"):
        classifier_outputs(np.zeros((2, 3, 4), np.float32), "m")
    assert classifier_outputs(np.zeros((2, 3), np.float64), "m").dtype == np.float32

    class Bare:
        name = "bare"

        def run(self, batch):
            return np.zeros((len(batch), 2), np.float32)

    info = runner_info(Bare())
    assert isinstance(info, RunnerInfo) and info.runtime == "bare" and info.num_classes is None


@pytest.mark.needs_openvino
def test_openvino_agrees_with_onnxruntime(resnet20_onnx):
    _, path = resnet20_onnx
    ov_runner = make_runner(path, runtime="openvino", threads=1)
    ort_runner = make_runner(path, threads=1)
    x = np.random.default_rng(5).standard_normal((3, 1, 28, 28), dtype=np.float32)
    a, b = ort_runner.run(x), ov_runner.run(x)
    assert b.shape == (3, 10)
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)  # FP32 in both (bf16 would be off by ~0.1)
    assert ov_runner.info.settings["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov_runner.info.settings["INFERENCE_NUM_THREADS"] == "1"
    assert ov_runner.info.num_classes == 10


def test_openvino_missing_is_a_clear_error(resnet20_onnx):
    if importlib.util.find_spec("openvino") is not None:
        pytest.skip("openvino is installed")
    _, path = resnet20_onnx
    with pytest.raises(RescompressError, match="install the openvino extra"):
        make_runner(path, runtime="openvino")


@pytest.mark.needs_cuda
def test_torch_runner_on_cuda_matches_cpu(resnet20_onnx):
    model, _ = resnet20_onnx
    x = np.random.default_rng(7).standard_normal((2, 1, 28, 28), dtype=np.float32)
    cpu = make_runner(model).run(x)
    gpu_runner = make_runner(model, device="cuda")
    assert gpu_runner.info.settings["device"] == "cuda" and gpu_runner.info.settings["tf32"] is False
    np.testing.assert_allclose(gpu_runner.run(x), cpu, rtol=1e-4, atol=1e-5)  # FP32 cuDNN kernels, TF32 off
    make_runner(model)  # leave the shared fixture's module back on the CPU for the other tests
