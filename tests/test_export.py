"""FP32 ONNX export: graph structure, dynamic batch, metadata round trip, parity, refusals, and the CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from rescompress.checkpoint import CheckpointHeader, load_checkpoint, save_checkpoint
from rescompress.cli.app import app
from rescompress.errors import RescompressError, UsageError
from rescompress.export import ExportError, ParityReport, export_onnx, float64_logits, read_onnx_info
from rescompress.folding import count_batchnorm, fold_batchnorm
from rescompress.models import build_model
from rescompress.spec import Preprocess, get_preset

REL_TOL = 1e-5
PLAIN_OPS = {"Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def ort_run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0]


def rel_err(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


CASES = {
    "resnet20": (dict(arch="resnet20", num_classes=10, in_channels=1), get_preset("fashion-mnist")),
    "resnet18": (dict(arch="resnet18", num_classes=7, in_channels=3), get_preset("imagenet").with_overrides(size=64)),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    build, pre = CASES[request.param]
    torch.manual_seed(0)
    model = randomize_bn(build_model(**build))
    folded = fold_batchnorm(model, input_shape=pre.input_shape(8)).model
    path = tmp_path_factory.mktemp("export") / f"{build['arch']}.onnx"
    result = export_onnx(folded, pre, path, arch=build["arch"], num_classes=build["num_classes"], folded=True)
    return model, pre, build, result


def test_export_graph_is_plain_checked_and_named(exported):
    _, pre, _, result = exported
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert set(ops) <= PLAIN_OPS, ops
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert dict(ops) == result.op_counts
    assert ops["Gemm"] == 1 and ops["GlobalAveragePool"] == 1
    assert next(o.version for o in proto.opset_import if o.domain == "") >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", pre.channels, *pre.size]
    assert out_dims[0] == "batch"
    assert result.size_bytes == result.path.stat().st_size


def test_export_runs_at_batch_1_and_3_like_torch(exported):
    model, pre, build, result = exported
    for batch in (1, 3):
        x = torch.randn(pre.input_shape(batch))
        with torch.no_grad():
            ref = model(x).numpy()
        out = ort_run(result.path, x.numpy())
        assert out.shape == (batch, build["num_classes"])
        assert rel_err(ref, out) <= REL_TOL
        assert np.array_equal(ref.argmax(1), out.argmax(1))


def test_export_parity_report(exported):
    _, pre, _, result = exported
    parity = result.parity
    assert parity is not None and parity.passed
    assert parity.probe_shape == pre.input_shape(8)
    assert 0.0 <= parity.max_rel_diff <= REL_TOL
    assert parity.max_abs_diff >= 0.0 and parity.top1_agreement == 100.0
    assert result.to_dict()["parity"]["passed"] is True


def test_metadata_round_trip(exported):
    _, pre, build, result = exported
    info = read_onnx_info(result.path)
    assert info.preprocess == pre
    assert info.arch == build["arch"]
    assert info.num_classes == build["num_classes"]
    assert info.in_channels == build["in_channels"]
    assert info.input_size == pre.size
    assert (info.input_name, info.output_name) == ("input", "logits")
    assert info.opset == 17 and info.tool_version is not None
    meta = info.metadata
    assert json.loads(meta["rescompress.mean"]) == pytest.approx(list(pre.mean_per_channel))
    assert json.loads(meta["rescompress.input_size"]) == list(pre.size)
    assert meta["rescompress.preset"] == pre.preset and meta["rescompress.folded"] == "1"


def test_unfolded_export_with_batchnorm_keeps_parity(tmp_path):
    pre = get_preset("fashion-mnist")
    model = randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    assert count_batchnorm(model) == 21
    result = export_onnx(model, pre, tmp_path / "nofold.onnx", arch="resnet20", num_classes=10, folded=False)
    ops = Counter(n.op_type for n in onnx.load(str(result.path)).graph.node)
    # The exporter folds eval-mode BN itself; either way no training-mode BN may remain.
    assert set(ops) <= PLAIN_OPS | {"BatchNormalization"}
    assert result.parity.max_rel_diff <= REL_TOL
    # The metadata says what the graph holds: "0" only where BatchNormalization nodes are left.
    left = ops.get("BatchNormalization", 0) > 0
    assert read_onnx_info(result.path).metadata["rescompress.folded"] == ("0" if left else "1")


def test_export_refuses_output_equal_to_input_and_old_opset(tmp_path):
    pre = get_preset("fashion-mnist")
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    src = save_checkpoint(model, tmp_path / "m.safetensors", CheckpointHeader("resnet20", 10, 1, pre))
    before = src.read_bytes()
    with pytest.raises(RescompressError, match="same file as input"):
        export_onnx(model, pre, src, arch="resnet20", num_classes=10, source=src)
    assert src.read_bytes() == before
    with pytest.raises(UsageError, match="opset 13"):
        export_onnx(model, pre, tmp_path / "o.onnx", arch="resnet20", num_classes=10, opset=13)
    with pytest.raises(UsageError, match="opset 21 is newer"):
        export_onnx(model, pre, tmp_path / "o.onnx", arch="resnet20", num_classes=10, opset=21)
    with pytest.raises(ExportError, match=r"expected \(8, 3\) logits"):
        export_onnx(model, pre, tmp_path / "o.onnx", arch="resnet20", num_classes=3)
    assert not (tmp_path / "o.onnx").exists()


class _Stateful(nn.Module):
    """Its output changes from call to call, so the traced graph cannot reproduce the reference run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x.mean(dim=(2, 3)).repeat(1, 4)) + float(self.calls)


def test_parity_failure_writes_nothing(tmp_path):
    pre = Preprocess("custom", (8, 8), 1, (0.5,), (0.5,))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="ONNX Runtime output differs from torch.*nothing written"):
        export_onnx(_Stateful().eval(), pre, out, arch="custom", num_classes=3)
    assert list(tmp_path.iterdir()) == []


def test_parity_rule_float32_noise_fallback():
    base = dict(max_abs_diff=3e-5, max_rel_diff=2e-5, top1_agreement=100.0, probe_shape=(8, 3, 224, 224))
    assert not ParityReport(**base).passed  # over rtol and no float64 reference
    # ORT nearer the exact float64 logits than torch itself (measured on resnet50 at 224x224): passes.
    assert ParityReport(**base, torch_fp64_rel_error=1.5e-5, ort_fp64_rel_error=1.2e-5).passed
    assert not ParityReport(**base, torch_fp64_rel_error=1.5e-5, ort_fp64_rel_error=3.1e-5).passed
    # A large torch-vs-float64 gap is not rounding noise: no fallback.
    assert not ParityReport(**base, torch_fp64_rel_error=0.5, ort_fp64_rel_error=0.2).passed
    assert not ParityReport(**{**base, "max_rel_diff": 1e-7, "top1_agreement": 87.5}).passed
    assert ParityReport(**{**base, "max_rel_diff": 1e-7}).passed


def test_float64_reference_measures_float32_rounding():
    model = randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    probe = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref32 = model(probe).numpy()
    exact = float64_logits(model, probe)
    assert exact.dtype == np.float64 and exact.shape == (4, 10)
    err = np.abs(ref32 - exact).max() / np.abs(exact).max()
    assert 0.0 < err < 1e-5  # float32 rounding: present, and small
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


# ---------------------------------------------------------------------------------------------- read_onnx_info
def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_read_onnx_info_refuses_non_classifiers(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])
    flat = _save(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), tmp_path / "flat.onnx")
    with pytest.raises(RescompressError, match="not an image classifier: input 'x' is 2-D"):
        read_onnx_info(flat)

    x4 = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y4 = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 8, 8])
    seg = _save(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x4], [y4]), tmp_path / "seg.onnx")
    with pytest.raises(RescompressError, match="output 'y' is 4-D, expected 2-D"):
        read_onnx_info(seg)

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(RescompressError, match="not a readable ONNX model"):
        read_onnx_info(junk)


def test_read_onnx_info_from_graph_shapes_of_a_foreign_file(tmp_path):
    # A classifier not made by this tool: dynamic output dim, classes only in the Gemm weight (transB=1).
    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "conv_w")
    fc_w = numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "fc_w")
    nodes = [
        helper.make_node("Conv", ["img", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w"], ["scores"], transB=1),
    ]
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 2, 20, 24])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "k"])
    path = _save(helper.make_graph(nodes, "g", [img], [scores], [conv_w, fc_w]), tmp_path / "foreign.onnx")
    info = read_onnx_info(path)
    assert (info.num_classes, info.in_channels, info.input_size) == (5, 2, (20, 24))
    assert (info.input_name, info.output_name) == ("img", "scores")
    assert info.preprocess is None and info.arch is None

    # Dynamic channels and spatial size: channels from the first Conv weight, size unknown.
    img_dyn = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", "c", "h", "w"])
    nodes[-1] = helper.make_node("MatMul", ["f", "fc_mm"], ["scores"])
    fc_mm = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "fc_mm")
    path2 = _save(helper.make_graph(nodes, "g", [img_dyn], [scores], [conv_w, fc_mm]), tmp_path / "dyn.onnx")
    info2 = read_onnx_info(path2)
    assert (info2.num_classes, info2.in_channels, info2.input_size) == (6, 2, None)


# ---------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


@pytest.fixture()
def model_files(tmp_path):
    """A reference-style ResNet-20 as a project checkpoint and as a plain torchvision-style state_dict."""
    model = randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    ckpt = save_checkpoint(
        model, tmp_path / "r20.safetensors",
        CheckpointHeader("resnet20", 10, 1, get_preset("fashion-mnist"), extra={"trained_on": "test"}),
    )
    sd = tmp_path / "r20.pt"
    torch.save(model.state_dict(), sd)
    return model, ckpt, sd


def test_cli_export_json(model_files, tmp_path):
    model, ckpt, _ = model_files
    out = tmp_path / "out" / "r20.onnx"
    res = runner.invoke(app, ["export", str(ckpt), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["arch"] == "resnet20" and data["fold"]["num_folded"] == 21
    assert data["parity"]["passed"] is True and data["parity"]["max_rel_diff"] <= REL_TOL
    assert "BatchNormalization" not in data["op_counts"]
    info = read_onnx_info(out)
    assert info.preprocess == get_preset("fashion-mnist") and info.num_classes == 10
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert rel_err(ref, ort_run(out, x)) <= REL_TOL


def test_cli_export_state_dict_human_output(model_files, tmp_path):
    _, _, sd = model_files
    out = tmp_path / "r20sd.onnx"
    args = ["export", str(sd), "-o", str(out), "--no-fold", "--preset", "fashion-mnist", "--opset", "18"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.stdout and "not by rescompress (--no-fold)" in res.stdout
    info = read_onnx_info(out)
    left = any(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    assert info.metadata["rescompress.folded"] == ("0" if left else "1") and info.opset == 18


def test_cli_export_errors(model_files, tmp_path):
    _, ckpt, _ = model_files
    before = ckpt.read_bytes()
    res = runner.invoke(app, ["export", str(ckpt), "-o", str(ckpt)])
    assert res.exit_code == 1
    assert res.stderr.strip().startswith("Error:") and "same file as input" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert ckpt.read_bytes() == before

    for opset in ("13", "21"):
        res = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--opset", opset])
        assert res.exit_code == 2
    res = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--channels", "3"])
    assert res.exit_code == 1 and "--channels 1" in res.stderr
    assert not (tmp_path / "x.onnx").exists()
    # evaluate/benchmark/gate tell ONNX files by their name: an ONNX file called .safetensors would be refused
    res = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "name the output *.onnx" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_fold_writes_a_reloadable_folded_checkpoint(model_files, tmp_path):
    model, ckpt, _ = model_files
    out = tmp_path / "r20.folded.safetensors"
    res = runner.invoke(app, ["fold", str(ckpt), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["num_folded"] == 21 and data["num_left"] == 0
    assert data["max_rel_diff"] <= REL_TOL and data["top1_agreement"] == 100.0
    folded, header = load_checkpoint(out)
    assert header.folded and header.arch == "resnet20" and count_batchnorm(folded) == 0
    assert header.extra == load_checkpoint(ckpt)[1].extra  # the source's record carries over
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(model(x).numpy(), folded(x).numpy()) <= REL_TOL

    res = runner.invoke(app, ["fold", str(ckpt), "-o", str(tmp_path / "f.onnx")])
    assert res.exit_code == 2 and "rescompress export" in res.stderr
    res = runner.invoke(app, ["fold", str(ckpt)])
    assert res.exit_code == 2


@pytest.mark.parametrize("cmd, name, fmt", [
    (["fold"], "f.pt", ".safetensors"), (["prune", "--ratio", "0.3", "--no-latency"], "p.pth", ".safetensors"),
    (["prune", "--ratio", "0.3", "--no-latency"], ".safetensors", ".safetensors"), (["export"], "e.pt", ".onnx"),
])
def test_outputs_named_for_another_format_are_refused(model_files, tmp_path, cmd, name, fmt):
    """fold and prune write safetensors: a file named .pt would fail torch.load, so the name is refused
    before any work; likewise export's ONNX."""
    _, ckpt, _ = model_files
    out = tmp_path / "out"
    out.mkdir()
    res = runner.invoke(app, [cmd[0], str(ckpt), *cmd[1:], "-o", str(out / name)])
    assert res.exit_code == 2, res.output
    assert f"name the output *{fmt}, not {name}" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list(out.iterdir())
    res = runner.invoke(app, [cmd[0], str(ckpt), *cmd[1:], "-o", "."])  # a path without a name: one line
    assert res.exit_code in (1, 2) and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.rstrip().endswith((f"name the output *{fmt}, not .", "it is a folder")), res.stderr


def test_unwritable_outputs_get_one_line_errors(tmp_path):
    """An output that is a folder, under a file, or an output folder that is a file: exit 1, one line
    naming the path asked for (not a temporary name), and nothing written."""
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    header = CheckpointHeader("resnet20", 10, 1, get_preset("fashion-mnist"))
    src = save_checkpoint(model, tmp_path / "m.safetensors", header)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("keep")
    runner = CliRunner()
    cases = [
        (["export", str(src), "-o", str(tmp_path / "a_folder")], "it is a folder"),
        (["export", str(src), "-o", str(tmp_path / "a_file" / "m.onnx")],
         f"cannot write {tmp_path / 'a_file' / 'm.onnx'}"),
        (["quantize", str(src), "--calib-data", str(tmp_path), "-o", str(tmp_path / "a_file")],
         "exists and is not a folder"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.output and "Traceback" not in r.output
        assert ".tmp" not in r.output
    assert (tmp_path / "a_file").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder", "m.safetensors"]
    assert not any((tmp_path / "a_folder").iterdir())


def test_failed_export_keeps_stdout_clean(tmp_path):
    """torch's C++ exporter prints its IR graph on fd 1 when it fails; --json output must stay parseable
    (the error document only) and stderr must end with the one-line error."""
    import os
    import subprocess
    import sys

    from torchvision.models import resnet18

    model = resnet18(num_classes=10).eval()
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))  # 7x7 -> 2x2 is not exportable at 224
    model.fc = nn.Linear(2048, 10)
    torch.save(model, tmp_path / "pool2.pt")
    proc = subprocess.run([sys.executable, "-m", "rescompress", "export", str(tmp_path / "pool2.pt"), "-o",
                           str(tmp_path / "p.onnx"), "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 1
    import json

    doc = json.loads(proc.stdout)  # one document: nothing of the IR graph before or after it
    assert doc["exit_code"] == 1 and doc["error"].startswith("torch.onnx.export failed")
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: torch.onnx.export failed")
    assert "Torch IR graph" not in proc.stderr and not (tmp_path / "p.onnx").exists()
