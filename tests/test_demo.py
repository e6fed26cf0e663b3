"""``rescompress demo`` end to end on the bundled model and data: every stage runs and the numbers hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rescompress.cli.app import app


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["model"]: r for r in doc["rows"]}
    assert list(rows) == ["FP32 ORT", "FP32 torch", "INT8 ORT", "INT8 TRT-QDQ*", "pruned FP32", "pruned INT8"]
    assert [s["stage"] for s in doc["stages"]] == [
        "load", "fold", "export", "quantize", "prune", "quantize pruned", "benchmark"
    ]
    assert doc["eval_images"] == 2000
    fp32 = rows["FP32 ORT"]["top-1"]
    assert fp32 > 90.0  # the bundled ResNet-20 scores 93.01% on the full test set
    assert rows["FP32 torch"]["agree"] == 100.0
    # INT8 keeps accuracy on the held-out slice; the ORT file is smaller than FP32.
    assert rows["INT8 ORT"]["top-1"] >= fp32 - 1.0 and rows["INT8 ORT"]["agree"] >= 98.0
    assert rows["INT8 ORT"]["SQNR"] >= 25.0
    assert rows["INT8 ORT"]["MB"] < rows["FP32 ORT"]["MB"] / 2
    assert rows["INT8 TRT-QDQ*"]["agree"] >= 97.0
    # Pruning kept about half the MACs and, after one epoch of fine-tuning, most of the accuracy.
    assert 0.4 <= rows["pruned FP32"]["MMACs"] / rows["FP32 ORT"]["MMACs"] <= 0.6
    assert rows["pruned INT8"]["top-1"] >= fp32 - 6.0
    files = {p.name for p in out.iterdir()}
    for name in ("resnet20_fashion_mnist.fp32.onnx", "resnet20_fashion_mnist.int8.ort.onnx",
                 "resnet20_fashion_mnist.int8.trt.onnx", "resnet20_fashion_mnist.pruned.safetensors"):
        assert name in files
    assert not [n for n in files if n.endswith(".tmp") or n.startswith(".")]  # no staging folder left
    assert all(Path(f).parent == out and Path(f).exists() for k, f in doc["files"].items() if k != "FP32 torch")
    for report in out.glob("*.quantize.json"):  # the nested quantize reports name files that exist
        d = json.loads(report.read_text())
        paths = [d["model"], *d["artifacts"].values()]
        assert len(paths) >= 8 and all(Path(p).exists() and Path(p).parent == out for p in paths), paths


def test_demo_interrupted_or_refused_leaves_no_folder(tmp_path):
    from rescompress.demo import DemoConfig, run_demo

    out = tmp_path / "demo"

    def interrupt(it, total, desc):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # during calibration, after the FP32 export was written
        run_demo(DemoConfig(outdir=out), progress=interrupt)
    assert not out.exists()
    for bad in ("0", "-1", "100000"):  # refused before any work (0 and -1 used to fail after a minute)
        result = CliRunner().invoke(app, ["demo", "-o", str(out), "--threads", bad])
        assert result.exit_code == 2, (bad, result.output)
    assert not out.exists()
