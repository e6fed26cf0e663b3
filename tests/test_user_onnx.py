"""ONNX files as users export them. A fixed batch size: a checked dynamic-batch copy, or chunked runs when
the graph depends on its batch (a Reshape to [1, ...]); quantize writes the copy and INT8 files that take any
batch. BatchNormalization left in the graph (``do_constant_folding=False``): folded on the ONNX graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from rescompress.cli.app import app
from rescompress.data import bundled_data
from rescompress.errors import RescompressError
from rescompress.export import dynamic_batch_copy, ort_logits
from rescompress.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _BatchOneHead(torch.nn.Module):
    """ResNet-20 whose classifier input is reshaped to a hard-coded [1, 64]: it only runs at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("resnet20", 10, 1).eval()

    def forward(self, x):
        n = self.net
        y = n.layer3(n.layer2(n.layer1(torch.relu(n.bn1(n.conv1(x))))))
        return n.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1).reshape(1, 64))


def _export_static(model: torch.nn.Module, path, batch: int = 1) -> None:
    torch.onnx.export(model.eval(), (torch.randn(batch, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["logits"], dynamo=False, opset_version=17)


@pytest.fixture(scope="module")
def static_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    torch.manual_seed(0)
    _export_static(build_model("resnet20", 10, 1), d / "batch1.onnx")
    _export_static(build_model("resnet20", 10, 1), d / "batch4.onnx", batch=4)
    _export_static(_BatchOneHead(), d / "reshape1.onnx")
    return d


@pytest.mark.parametrize("name,fixed", [("batch1.onnx", 1), ("batch4.onnx", 4)])
def test_dynamic_copy_matches_the_fixed_file(static_files, name, fixed):
    proto = onnx.load(str(static_files / name))
    copy, got_fixed = dynamic_batch_copy(proto)
    assert got_fixed == fixed
    assert copy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((9, 1, 28, 28)).astype(np.float32))
    ref = np.concatenate([ort_logits(proto.SerializeToString(), x[i : i + fixed]) for i in (0, fixed)])
    got = ort_logits(copy.SerializeToString(), x)  # any batch size now
    assert got.shape == (9, 10)
    np.testing.assert_allclose(got[: 2 * fixed], ref, rtol=1e-5, atol=1e-5)
    again, none = dynamic_batch_copy(copy)  # already dynamic: returned as it is
    assert none is None and again is copy


def test_graph_tied_to_its_batch_is_refused_with_how_to_re_export(static_files):
    with pytest.raises(RescompressError, match=r"fixed batch size of 1 .* dynamic_axes"):
        dynamic_batch_copy(onnx.load(str(static_files / "reshape1.onnx")), "reshape1.onnx")


def test_runner_runs_a_batch_tied_file_in_chunks(static_files):
    from rescompress.runtimes import make_runner

    runner = make_runner(str(static_files / "reshape1.onnx"), runtime="onnxruntime")
    x = np.random.default_rng(2).standard_normal((3, 1, 28, 28)).astype(np.float32)
    got = runner.run(x)
    per_image = np.concatenate([runner.run(x[i : i + 1]) for i in range(3)])
    assert got.shape == (3, 10)
    np.testing.assert_array_equal(got, per_image)
    assert runner.info.settings["fixed_batch_in_file"] == 1


def test_quantize_a_fixed_batch_file(static_files, calib_npz, tmp_path):
    out = tmp_path / "q"
    res = CliRunner().invoke(app, [
        "quantize", str(static_files / "batch1.onnx"), "--calib-data", str(calib_npz), "--preset", "fashion-mnist",
        "--num-images", "32", "--weight-rounding", "nearest", "--refine-tensors", "0", "--no-latency",
        "-o", str(out), "--json",
    ])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["artifacts"]["fp32"].endswith("q/batch1.fp32.onnx")  # the copy; the input is left alone
    assert data["fp32_rewrites"] == ["its fixed batch of 1 made dynamic"]
    for name in ("batch1.fp32.onnx", "batch1.int8.ort.onnx", "batch1.int8.trt.onnx"):
        dim = onnx.load(str(out / name)).graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param == "batch", name
    assert data["fidelity"]["onnxruntime"]["sqnr_db"] > 20.0
    res = CliRunner().invoke(app, [
        "quantize", str(static_files / "reshape1.onnx"), "--calib-data", str(calib_npz), "--preset", "fashion-mnist",
        "--no-latency", "-o", str(tmp_path / "r"),
    ])
    assert res.exit_code == 1 and "fixed batch size of 1" in res.output
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def unfolded_bn(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so a wrong fold shows
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("bn") / "bn.onnx"
    torch.onnx.export(model, (torch.randn(2, 1, 28, 28),), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=False, opset_version=17, do_constant_folding=False, dynamic_axes={"input": {0: "b"}})
    return path


def test_batchnorm_folded_on_the_onnx_graph(unfolded_bn):
    from rescompress.folding import fold_onnx_batchnorm

    proto = onnx.load(str(unfolded_bn))
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 21
    folded, count = fold_onnx_batchnorm(proto)
    assert count == 21 and not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert sum(n.op_type == "Conv" for n in folded.graph.node) == 21
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 1, 28, 28)).astype(np.float32))
    ref = ort_logits(proto.SerializeToString(), x)
    np.testing.assert_allclose(ort_logits(folded.SerializeToString(), x), ref, rtol=1e-5,
                               atol=1e-5 * float(np.abs(ref).max()))


def test_quantize_folds_batchnorm_of_an_onnx_file(unfolded_bn, calib_npz, tmp_path):
    out = tmp_path / "q"
    res = CliRunner().invoke(app, [
        "quantize", str(unfolded_bn), "--calib-data", str(calib_npz), "--preset", "fashion-mnist", "--num-images",
        "32", "--weight-rounding", "nearest", "--refine-tensors", "0", "--no-latency", "-o", str(out), "--json",
    ])
    assert res.exit_code == 0, res.output
    assert "21 BatchNormalization folded" in res.stderr
    data = json.loads(res.stdout)
    assert data["fp32_rewrites"] == ["21 BatchNormalization folded into the convolutions"]
    assert "the given file with 21 BatchNormalization folded" in (out / "bn.quantize.md").read_text()
    assert data["artifacts"]["fp32"].endswith("q/bn.fp32.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out / "bn.fp32.onnx")).graph.node)
    assert data["fidelity"]["onnxruntime"]["sqnr_db"] > 20.0


def test_quantize_converts_an_old_opset(calib_npz, tmp_path):
    """Files exported at opset 11 (common in older projects) are converted to opset 17, checked equal."""
    old = tmp_path / "op11.onnx"
    torch.manual_seed(0)
    torch.onnx.export(build_model("resnet20", 10, 1).eval(), (torch.randn(2, 1, 28, 28),), str(old),
                      input_names=["input"], output_names=["logits"], dynamo=False, opset_version=11,
                      dynamic_axes={"input": {0: "b"}})
    assert onnx.load(str(old)).opset_import[0].version == 11
    out = tmp_path / "q"
    res = CliRunner().invoke(app, [
        "quantize", str(old), "--calib-data", str(calib_npz), "--preset", "fashion-mnist", "--num-images", "32",
        "--weight-rounding", "nearest", "--refine-tensors", "0", "--no-latency", "-o", str(out), "--json",
    ])
    assert res.exit_code == 0, res.output
    assert "opset 11 converted to 17" in res.stderr
    for name in ("op11.fp32.onnx", "op11.int8.ort.onnx", "op11.int8.trt.onnx"):
        assert onnx.load(str(out / name)).opset_import[0].version >= 17, name
    assert json.loads(res.stdout)["fidelity"]["onnxruntime"]["sqnr_db"] > 20.0


def test_quantize_takes_weights_out_of_the_graph_inputs(calib_npz, tmp_path):
    """keep_initializers_as_inputs=True lists every weight as a graph input, which keeps ONNX Runtime from
    optimizing the FP32 baseline; the FP32 copy lists only the image input."""
    src = tmp_path / "kin.onnx"
    torch.onnx.export(build_model("resnet20", 10, 1).eval(), (torch.randn(2, 1, 28, 28),), str(src),
                      input_names=["input"], output_names=["logits"], dynamo=False, opset_version=17,
                      keep_initializers_as_inputs=True, dynamic_axes={"input": {0: "b"}})
    assert len(onnx.load(str(src)).graph.input) > 1
    out = tmp_path / "q"
    res = CliRunner().invoke(app, [
        "quantize", str(src), "--calib-data", str(calib_npz), "--preset", "fashion-mnist", "--num-images", "32",
        "--weight-rounding", "nearest", "--refine-tensors", "0", "--no-latency", "-o", str(out),
    ])
    assert res.exit_code == 0, res.output
    assert "weights taken out of the graph inputs" in res.stderr
    assert [i.name for i in onnx.load(str(out / "kin.fp32.onnx")).graph.input] == ["input"]
    assert [i.name for i in onnx.load(str(out / "kin.int8.ort.onnx")).graph.input] == ["input"]


def test_probability_head_stays_float_without_a_warning(tmp_path):
    """Models exported with their Softmax: it stays float (like the logits) and is not reported."""
    from rescompress.quantization.placement import place, prepare_model

    path = tmp_path / "smx.onnx"
    model = torch.nn.Sequential(build_model("resnet20", 10, 1), torch.nn.Softmax(dim=1)).eval()
    torch.onnx.export(model, (torch.randn(2, 1, 28, 28),), str(path), input_names=["input"], output_names=["probs"],
                      dynamo=False, opset_version=17, dynamic_axes={"input": {0: "b"}})
    m = prepare_model(onnx.load(str(path)))
    for target in ("onnxruntime", "tensorrt"):
        p = place(m, target)
        assert p.unsupported == () and len(p.weights) == 22, target


class _ChannelsLast(torch.nn.Module):
    """ResNet-20 taking (N, H, W, C) images, as TensorFlow/Keras exports do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("resnet20", 10, 1).eval()

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("command", ["inspect", "evaluate", "quantize"])
def test_channels_last_input_refused_with_how_to_reexport(tmp_path, command):
    path = tmp_path / "nhwc.onnx"
    torch.onnx.export(_ChannelsLast(), (torch.randn(2, 28, 28, 1),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "n", 1: "h", 2: "w"}}, dynamo=False)
    data = str(bundled_data("eval"))
    args = {"inspect": [], "evaluate": ["--data", data],
            "quantize": ["--calib-data", data, "-o", str(tmp_path / "out")]}[command]
    r = CliRunner().invoke(app, [command, str(path), *args])
    assert r.exit_code == 1
    assert "takes channels-last input 'image' (?, ?, ?, 1)" in r.output and "--inputs-as-nchw" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nhwc.onnx"]


class _Uint8Input(torch.nn.Module):
    """ResNet-20 with its preprocessing in the graph: raw uint8 pixels in."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("resnet20", 10, 1).eval()

    def forward(self, x):
        return self.net((x.float() / 255.0 - 0.286) / 0.353)


def test_integer_input_refused_with_what_to_export(tmp_path):
    path = tmp_path / "u8.onnx"
    torch.onnx.export(_Uint8Input(), (torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8),), str(path),
                      input_names=["pixels"], output_names=["logits"], dynamic_axes={"pixels": {0: "n"}},
                      dynamo=False)
    data = str(bundled_data("eval"))
    for args in (["evaluate", str(path), "--data", data, "--limit", "8"],
                 ["quantize", str(path), "--calib-data", data, "-o", str(tmp_path / "out")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1, r.output
        assert "takes uint8 input 'pixels'" in r.output and "float32 input" in r.output
    r = CliRunner().invoke(app, ["inspect", str(path), "--json"])  # inspect only reads the graph: it shows it
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_classes"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u8.onnx"]


def test_unfolded_onnx_counts_batchnorm_parameters_like_torch(unfolded_bn):
    """An unfolded graph counted fewer parameters than its folded version (BatchNormalization skipped)."""
    from rescompress.folding import fold_onnx_batchnorm
    from rescompress.profile import count_onnx_params, count_params

    graph = onnx.load(str(unfolded_bn))
    torch_count = count_params(build_model("resnet20", 10, 1))
    assert count_onnx_params(graph.graph) == torch_count
    folded, pairs = fold_onnx_batchnorm(graph)
    bn_channels = sum(m.num_features for m in build_model("resnet20", 10, 1).modules()
                      if isinstance(m, torch.nn.BatchNorm2d))
    assert pairs == 19 + 2 and count_onnx_params(folded.graph) == torch_count - bn_channels


def test_two_output_graph_is_refused_not_read_as_logits(tmp_path, calib_npz):
    """output[0] was taken as the logits: a (features, logits) export was scored on its 512 features."""
    from typer.testing import CliRunner

    from rescompress.cli.app import app

    class TwoOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = build_model("resnet20", 10, 1).eval()

        def forward(self, x):
            logits = self.m(x)
            return logits.relu(), logits

    path = tmp_path / "two.onnx"
    torch.onnx.export(TwoOutputs().eval(), (torch.randn(1, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["feat", "logits"], dynamo=False, opset_version=17)
    for args in (["quantize", str(path), "--calib-data", str(calib_npz), "--preset", "fashion-mnist", "-o",
                  str(tmp_path / "q")], ["evaluate", str(path), "--data", str(calib_npz), "--preset", "fashion-mnist"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1 and "has 2 outputs (feat, logits)" in res.stderr, res.output
    assert not (tmp_path / "q").exists()
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0  # inspect still describes it
