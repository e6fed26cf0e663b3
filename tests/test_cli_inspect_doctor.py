"""``rescompress inspect`` and ``rescompress doctor`` through the real Typer app: output, JSON, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rescompress.cli.app import app
from rescompress.models import build_model
from rescompress.profile import count_macs
from rescompress.spec import get_preset

runner = CliRunner()


@pytest.fixture(scope="module")
def resnet50_state_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("r50") / "resnet50_state_dict.pt"
    torch.save(build_model("resnet50").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def r20_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("r20") / "r20.pt"
    torch.save(build_model("resnet20", 10, 1).state_dict(), path)
    return path


def test_inspect_resnet50_state_dict_no_flags(resnet50_state_dict):
    result = runner.invoke(app, ["inspect", str(resnet50_state_dict)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "resnet50" in out and "state_dict" in out
    assert "25.6 M" in out
    assert "4.09 G at 224×224" in out
    assert "imagenet" in out and "1000" in out


def test_inspect_json_and_input_size(r20_path):
    result = runner.invoke(app, ["inspect", str(r20_path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    model = build_model("resnet20", 10, 1)
    assert (d["arch"], d["num_classes"], d["in_channels"], d["source_format"]) == ("resnet20", 10, 1, "state_dict")
    assert d["preprocess"] == get_preset("fashion-mnist").to_dict()
    assert d["macs"] == count_macs(model, (1, 1, 28, 28)) and d["input_shape"] == [1, 1, 28, 28]
    assert d["params"] == sum(p.numel() for p in model.parameters())

    result = runner.invoke(app, ["inspect", str(r20_path), "--input-size", "56", "--json"])
    assert result.exit_code == 0, result.output
    d56 = json.loads(result.stdout)
    # Convs scale with the pixel count (4x); the classifier's 64*10 MACs do not.
    assert d56["macs"] == count_macs(model, (1, 1, 56, 56)) == 4 * d["macs"] - 3 * 64 * 10
    assert d56["preprocess"]["size"] == [56, 56]

    result = runner.invoke(app, ["inspect", str(r20_path), "--input-size", "28x40", "--json"])
    assert result.exit_code == 0, result.output
    wide = json.loads(result.stdout)  # height x width
    assert wide["preprocess"]["size"] == [28, 40] and wide["input_shape"] == [1, 1, 28, 40]
    assert wide["macs"] == count_macs(model, (1, 1, 28, 40))


def test_inspect_onnx_reads_graph(tmp_path):
    from rescompress.export import export_onnx

    model = build_model("resnet20", 10, 1).eval()
    path = tmp_path / "r20.onnx"
    export_onnx(model, get_preset("fashion-mnist"), path, arch="resnet20", num_classes=10, check_parity=False)
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["source_format"] == "onnx" and d["opset"] >= 17 and d["arch"] == "resnet20"
    assert d["input_shape"][1:] == [1, 28, 28] and d["output_shape"][-1] == 10
    assert d["num_classes"] == 10 and d["in_channels"] == 1 and d["qdq_nodes"] == 0
    assert d["op_counts"]["Conv"] == 21  # 19 3x3 convs + 2 downsample 1x1 convs
    assert d["macs"] == count_macs(model, (1, 1, 28, 28))
    assert d["metadata"]["rescompress.arch"] == "resnet20"

    human = runner.invoke(app, ["inspect", str(path), "--input-size", "56"])
    assert human.exit_code == 0, human.output
    assert "opset 17" in human.stdout and "Q/DQ nodes" in human.stdout
    assert "at 56×56" in human.stdout


def test_inspect_qdq_onnx_counts_quantize_nodes(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.ones((5, 4), np.float32), "fc")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
        helper.make_node("Conv", ["dq", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [w, fc, scale, zp],
    )
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["qdq_nodes"] == 2 and d["num_classes"] == 5 and d["in_channels"] == 3
    assert d["params"] == 4 * 3 * 3 * 3 + 5 * 4  # scales and zero points are not weights
    assert d["macs"] == 4 * 8 * 8 * 27 + 5 * 4


def test_inspect_errors_are_one_line_exit_1(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("definitely not a model")
    for path in (bad, tmp_path / "missing.pt"):
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 1
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ")
        assert result.stdout == ""


def test_inspect_malicious_pickle_refused_file_not_created(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "refused to unpickle" in result.stderr and "--trust-pickle" in result.stderr
    assert not marker.exists()


def test_inspect_wrong_arch_is_error_and_usage_errors_exit_2(r20_path):
    result = runner.invoke(app, ["inspect", str(r20_path), "--arch", "resnet50"])
    assert result.exit_code == 1 and "do not fit --arch resnet50" in result.stderr
    assert runner.invoke(app, ["inspect"]).exit_code == 2
    assert runner.invoke(app, ["inspect", str(r20_path), "--input-size", "abc"]).exit_code == 2
    for bad in ("3x0", "2x3x4", "-5"):
        result = runner.invoke(app, ["inspect", str(r20_path), "--input-size", bad])
        assert result.exit_code == 2 and "HxW" in result.output, bad
    assert runner.invoke(app, ["inspect", str(r20_path), "--no-such-flag"]).exit_code == 2


def test_doctor_human_and_json():
    import onnxruntime
    import torchvision

    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert torch.__version__ in result.stdout and "AVX-512 VNNI" in result.stdout
    assert "tensorrt" in result.stdout and "ORT providers" in result.stdout

    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["libraries"]["torch"] == torch.__version__
    assert d["libraries"]["torchvision"] == torchvision.__version__
    assert d["libraries"]["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in d["onnxruntime_providers"]
    assert d["torch"]["threads"] == torch.get_num_threads()
    assert d["torch"]["cuda_available"] == torch.cuda.is_available()
    assert {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"} <= set(d["cpu"])
    # The INT8 paths list is exactly the CPU flags that are set.
    flags = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX-512 VNNI": "avx512_vnni", "AVX-VNNI": "avx_vnni",
             "AMX-INT8": "amx_int8"}
    assert {k for k, f in flags.items() if d["cpu"][f]} == set(d["int8_cpu_paths"])


def test_doctor_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    """A TensorRT wheel without its CUDA libraries imports with an error; doctor says so, not "not installed"."""
    import sys

    pkg = tmp_path / "tensorrt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["libraries"]["tensorrt"] is None
    assert d["library_import_errors"] == {"tensorrt": "libnvinfer.so.10: cannot open shared object file"}
    result = runner.invoke(app, ["doctor"])
    assert "installed, does not import: libnvinfer.so.10" in " ".join(result.stdout.split())


def test_cli_starts_without_importing_torch():
    """`rescompress --help` / `--version` must not pay torch's multi-second import (and a Ctrl-C during
    that import gave a traceback): command modules import the heavy libraries inside their functions."""
    import os
    import subprocess
    import sys

    code = "import sys, rescompress.cli.app; print(sorted({'torch', 'torchvision', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_error_line_keeps_a_dataloader_workers_original_message():
    """torch re-raises a worker's exception with the worker's traceback as its message; the one-line error
    keeps the original message."""
    from rescompress.cli.common import _message
    from rescompress.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"data.py\", line 137\nrescompress.errors.DataError: cannot read image z.png")
    assert _message(wrapped) == "cannot read image z.png"
    assert _message(DataError("plain: message")) == "plain: message"


@pytest.mark.parametrize("columns", ["0", "1", "abc"])
def test_error_line_and_tables_survive_a_tiny_columns_setting(columns, r20_path, tmp_path):
    """COLUMNS=0 made rich print nothing at all, the promised Error: line included."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": columns, "PYTHONPATH": os.getcwd()}
    run = [sys.executable, "-m", "rescompress"]
    out = subprocess.run([*run, "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 1 and out.stderr.startswith("Error: ") and "missing.onnx" in out.stderr
    out = subprocess.run([*run, "inspect", str(r20_path)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "resnet20" in out.stdout


def test_errors_with_json_print_one_json_document(r20_path, tmp_path):
    """With --json a CI job reads stdout: an error gives a JSON document there too (and the line on stderr)."""
    cases = [
        (["inspect", str(tmp_path / "missing.pt"), "--json"], 1, "error", "does not exist"),
        (["prune", str(r20_path), "--ratio", "1.5", "--json", "-o", str(tmp_path / "p.safetensors")], 2, "usage",
         "--ratio must be in (0, 1)"),
        (["evaluate", str(r20_path), "--data", str(tmp_path / "nodata"), "--json"], 1, "error", "nodata"),
    ]
    for args, code, kind, text in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == code, (args, r.output)
        doc = json.loads(r.stdout)
        assert doc["exit_code"] == code and doc["kind"] == kind and text in doc["error"], (args, doc)
        assert r.stderr.strip().splitlines()[-1].startswith("Error: ")
    r = runner.invoke(app, ["inspect", str(tmp_path / "missing.pt")])  # without --json: nothing on stdout
    assert r.exit_code == 1 and r.stdout == ""
