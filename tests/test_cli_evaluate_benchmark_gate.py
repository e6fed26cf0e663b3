"""CLI: evaluate, benchmark and gate on real models (safetensors checkpoints, exported ONNX) and bundled data."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from rescompress.checkpoint import CheckpointHeader, load_checkpoint, save_checkpoint
from rescompress.cli.app import app
from rescompress.export import export_onnx
from rescompress.models import build_model
from rescompress.spec import get_preset

cli = CliRunner()
FMNIST = get_preset("fashion-mnist")
FAST = ["--threads", "1", "--limit", "200"]
TIMING = ["--warmup", "0", "--iters", "2", "--rounds", "2"]


def _save(model: torch.nn.Module, path, arch: str = "resnet20", classes: int = 10):
    save_checkpoint(model, path, CheckpointHeader(arch, classes, 1, FMNIST))
    return path


def _add_conv_noise(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * scale * m.weight.std())
    return model


def _probe_trained_resnet20(calib_npz) -> torch.nn.Module:
    """A real classifier in seconds: random convs, BN statistics from data, and a least-squares head.

    Full training is minutes on 2 cores; this one reaches roughly 50-60% top-1 on Fashion-MNIST, enough
    for an accuracy drop to be measurable when its conv weights are perturbed.
    """
    from rescompress.data import open_dataset

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1)
    ds = open_dataset(calib_npz, FMNIST)
    x = torch.stack([ds[i][0] for i in range(256)])
    y = torch.tensor([ds[i][1] for i in range(256)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)  # the reference init zeroes each block's last BN
                m.momentum = None  # cumulative average: the statistics of exactly this batch
                m.reset_running_stats()
        model.train()
        model(x)
        model.eval()
        feats = {}
        handle = model.avgpool.register_forward_hook(lambda _m, _i, out: feats.setdefault("f", out.flatten(1)))
        model(x)
        handle.remove()
        f = torch.cat([feats["f"], torch.ones(len(x), 1)], 1).double()
        target = torch.nn.functional.one_hot(y, 10).double()
        w = torch.linalg.solve(f.T @ f + 1e-3 * torch.eye(f.shape[1], dtype=torch.float64), f.T @ target)
        model.fc.weight.copy_(w[:-1].T.float())
        model.fc.bias.copy_(w[-1].float())
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory, calib_npz):
    d = tmp_path_factory.mktemp("cli")
    model = _probe_trained_resnet20(calib_npz)
    out = {"a": _save(model, d / "a.safetensors")}
    export_onnx(model, FMNIST, d / "a.onnx", arch="resnet20", num_classes=10)
    out["a_onnx"] = d / "a.onnx"
    noisy, _ = load_checkpoint(out["a"])
    out["noisy"] = _save(_add_conv_noise(noisy, 1.0), d / "noisy.safetensors")
    out["seven"] = _save(build_model("resnet20", 7, 1).eval(), d / "seven.safetensors", classes=7)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, 28, 28])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["out"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / "relu.onnx"))
    out["relu"] = d / "relu.onnx"
    np.savez(d / "unlabeled.npz", x=np.zeros((8, 28, 28), np.uint8))
    out["unlabeled"] = d / "unlabeled.npz"
    out["dir"] = d
    return out


def _last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_json_torch_and_onnx_agree(files, eval_npz):
    r1 = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--json", *FAST])
    assert r1.exit_code == 0, r1.stderr
    d1 = json.loads(r1.stdout)
    assert d1["images"] == 200 and d1["runtime"] == "torch" and d1["arch"] == "resnet20"
    assert d1["top1"] == pytest.approx(100 * d1["correct1"] / 200)
    assert d1["correct1"] <= d1["correct5"] <= 200
    assert d1["top1"] > 30.0  # a real (probe-trained) classifier, far above 10% chance
    r2 = cli.invoke(app, ["evaluate", str(files["a_onnx"]), "--data", str(eval_npz), "--json", *FAST])
    assert r2.exit_code == 0, r2.stderr
    d2 = json.loads(r2.stdout)
    assert d2["runtime"] == "onnxruntime"
    assert (d2["correct1"], d2["correct5"]) == (d1["correct1"], d1["correct5"])


def test_evaluate_errors(files, eval_npz):
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(files["unlabeled"])])
    assert r.exit_code == 1 and "labeled" in r.stderr and r.stderr.count("\n") == 1
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--channels", "3"])
    assert r.exit_code == 1 and "1-channel input" in r.stderr and "--channels 1" in r.stderr
    r = cli.invoke(app, ["evaluate", str(files["a_onnx"]), "--data", str(eval_npz), "--input-size", "32"])
    assert r.exit_code == 1 and "takes 28x28 input" in r.stderr
    r = cli.invoke(app, ["evaluate", str(files["relu"]), "--data", str(eval_npz)])
    assert r.exit_code == 1 and "not an image classifier" in r.stderr


# ------------------------------------------------------------------------------------------ benchmark
def test_benchmark_two_models_json_and_report(files, eval_npz):
    report = files["dir"] / "bench.md"
    args = ["benchmark", str(files["a"]), str(files["a_onnx"]), "--data", str(eval_npz), "--batch", "1,2",
            "--report", str(report), "--json", *FAST, *TIMING]
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    labels = [m["label"] for m in d["models"]]
    assert labels == ["a.safetensors", "a.onnx"] and d["baseline"] == "a.safetensors"
    onnx_entry = d["models"][1]
    assert onnx_entry["runtime"] == "onnxruntime" and onnx_entry["agreement"]["top1_agreement"] == 100.0
    assert onnx_entry["accuracy"]["correct1"] == d["models"][0]["accuracy"]["correct1"]
    assert onnx_entry["macs"] == d["models"][0]["macs"] > 0
    assert onnx_entry["file_bytes"] == files["a_onnx"].stat().st_size
    lat = d["latency"]
    assert len(lat["stats"]) == 4 and len(lat["ratios"]) == 2 and lat["order"] == [labels, labels[::-1]]
    for ratio in lat["ratios"]:
        base = next(s for s in lat["stats"] if s["runner"] == labels[0] and s["batch"] == ratio["batch"])
        cand = next(s for s in lat["stats"] if s["runner"] == labels[1] and s["batch"] == ratio["batch"])
        assert ratio["speedup"] == pytest.approx(base["median_ms"] / cand["median_ms"])
    assert d["settings"]["ort_spinning"] is False and d["settings"]["threads"] == 1
    md = report.read_text()
    assert "| a.onnx | onnxruntime |" in md and "| a.onnx | 2 |" in md and "spinning: off" in md


def test_benchmark_human_output_says_spinning_off(files):
    r = cli.invoke(app, ["benchmark", str(files["a_onnx"]), "--batch", "1", "--threads", "1", *TIMING])
    assert r.exit_code == 0, r.stderr
    assert "ONNX Runtime thread spinning: off" in r.stdout and "Latency" in r.stdout


def test_benchmark_refuses_report_over_input_and_class_mismatch(files, eval_npz):
    before = files["a_onnx"].read_bytes()
    r = cli.invoke(app, ["benchmark", str(files["a"]), str(files["a_onnx"]), "--report", str(files["a_onnx"])])
    assert r.exit_code == 1 and "same file as input" in r.stderr
    assert files["a_onnx"].read_bytes() == before
    r = cli.invoke(app, ["benchmark", str(files["a"]), str(files["seven"]), "--data", str(eval_npz)])
    assert r.exit_code == 1 and "different numbers of classes" in r.stderr


# ------------------------------------------------------------------------------------------ gate
def _gate(files, eval_npz, *extra: str):
    return cli.invoke(app, ["gate", "--data", str(eval_npz), *FAST, *extra])


def test_gate_candidate_equal_to_baseline_passes(files, eval_npz):
    junit = files["dir"] / "pass.xml"
    r = _gate(files, eval_npz, "--baseline", str(files["a"]), "--candidate", str(files["a_onnx"]),
              "--junit", str(junit))
    assert r.exit_code == 0, r.stderr
    assert _last_line(r.stdout) == "PASSED"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert [c.get("name") for c in suite.findall("testcase")] == ["accuracy_drop", "top1_agreement"]
    assert suite.get("failures") == "0" and not suite.findall("testcase/failure")


def test_gate_perturbed_candidate_fails_with_exit_3(files, eval_npz):
    junit = files["dir"] / "fail.xml"
    r = _gate(files, eval_npz, "--baseline", str(files["a"]), "--candidate", str(files["noisy"]),
              "--junit", str(junit))
    assert r.exit_code == 3, r.stderr
    assert _last_line(r.stdout) == "FAILED: accuracy_drop, top1_agreement"
    failures = ET.parse(junit).getroot().findall("testsuite/testcase/failure")
    assert [f.get("message").split(" ")[0] for f in failures] == ["accuracy_drop", "top1_agreement"]
    # With a loose drop threshold only the agreement check is named.
    r = _gate(files, eval_npz, "--baseline", str(files["a"]), "--candidate", str(files["noisy"]),
              "--max-drop", "100")
    assert r.exit_code == 3 and _last_line(r.stdout) == "FAILED: top1_agreement"


def test_gate_reference_model_with_noise_fails_on_accuracy_drop(reference_checkpoint, eval_npz, tmp_path):
    if not reference_checkpoint.exists():
        pytest.skip("the trained reference checkpoint is not bundled yet")
    model, header = load_checkpoint(reference_checkpoint)
    noisy = tmp_path / "noisy_ref.safetensors"
    save_checkpoint(_add_conv_noise(model, 0.5), noisy, header)
    r = cli.invoke(app, ["gate", "--baseline", str(reference_checkpoint), "--candidate", str(noisy),
                         "--data", str(eval_npz), *FAST, "--json"])
    assert r.exit_code == 3, r.stderr
    d = json.loads(r.stdout)
    assert "accuracy_drop" in d["verdict"] and d["passed"] is False
    drop = next(c for c in d["checks"] if c["name"] == "accuracy_drop")
    assert drop["value"] > 0.5 and drop["value"] == pytest.approx(d["baseline"]["top1"] - d["candidate"]["top1"])


def test_gate_against_stored_metrics_edge_is_inclusive(files, eval_npz):
    metrics = files["dir"] / "metrics.json"
    r = _gate(files, eval_npz, "--baseline", str(files["a"]), "--candidate", str(files["a_onnx"]),
              "--save-metrics", str(metrics))
    assert r.exit_code == 0, r.stderr
    stored = json.loads(metrics.read_text())
    assert stored["n"] == 200 and len(stored["predictions"]) == 200
    cand_top1 = stored["top1"]
    edge = files["dir"] / "edge.json"
    edge.write_text(json.dumps({**stored, "top1": cand_top1 + 0.5}))  # drop exactly 0.5 points
    junit = files["dir"] / "against.xml"
    r = _gate(files, eval_npz, "--against", str(edge), "--candidate", str(files["a_onnx"]), "--max-drop", "0.5",
              "--json", "--junit", str(junit))
    assert r.exit_code == 0, r.stderr
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    assert props["against"] == str(edge) and props["against_model"] == stored["model"]
    d = json.loads(r.stdout)
    assert d["verdict"] == "PASSED"
    assert [c["name"] for c in d["checks"]] == ["accuracy_drop_vs_stored", "top1_agreement_vs_stored"]
    assert d["checks"][0]["value"] == pytest.approx(0.5) and d["checks"][1]["value"] == 100.0
    over = files["dir"] / "over.json"
    over.write_text(json.dumps({**stored, "top1": cand_top1 + 0.5 + 100 / 200}))  # one image more
    r = _gate(files, eval_npz, "--against", str(over), "--candidate", str(files["a_onnx"]), "--max-drop", "0.5")
    assert r.exit_code == 3
    assert _last_line(r.stdout) == "FAILED: accuracy_drop_vs_stored"


def test_gate_record_only_then_against_other_data_is_an_error(files, eval_npz):
    metrics = files["dir"] / "m100.json"
    r = cli.invoke(app, ["gate", "--candidate", str(files["a"]), "--data", str(eval_npz), "--limit", "100",
                         "--threads", "1", "--save-metrics", str(metrics), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["checks"] == [] and d["verdict"].startswith("RECORDED") and "checked nothing" in r.stderr
    assert json.loads(metrics.read_text())["n"] == 100
    r = _gate(files, eval_npz, "--against", str(metrics), "--candidate", str(files["a"]))
    assert r.exit_code == 1 and "use the same --data and --limit" in r.stderr
    # refused from the image count alone, before any model is evaluated
    assert "measured on 100 images, this run would evaluate 200" in r.stderr and "evaluating" not in r.stderr
    for bad in ("-0.1", "nan"):
        r = _gate(files, eval_npz, "--against", str(metrics), "--candidate", str(files["a"]), "--max-drop", bad)
        assert r.exit_code == 2 and "non-negative" in r.stderr


def test_gate_latency_check(files, eval_npz):
    r = _gate(files, eval_npz, "--baseline", str(files["a"]), "--candidate", str(files["a_onnx"]),
              "--max-latency-ratio", "1000", *TIMING, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    lat = next(c for c in d["checks"] if c["name"] == "latency_ratio")
    assert lat["passed"] and lat["value"] == pytest.approx(
        d["candidate"]["latency_ms"] / d["baseline"]["latency_ms"]
    )
    r = _gate(files, eval_npz, "--against", str(files["dir"] / "metrics.json"), "--candidate",
              str(files["a_onnx"]), "--max-latency-ratio", "2")
    assert r.exit_code == 2 and "needs --baseline" in r.stderr


def test_gate_bad_input_is_one_line_exit_1_and_writes_only_an_error_report(files, eval_npz):
    """A model or data problem exits 1 and replaces --junit's file with an error report (an earlier run's PASS
    must not stay for CI to show); option problems write nothing at all."""
    import xml.etree.ElementTree as ET

    junit = files["dir"] / "never.xml"
    junit.write_text("<testsuites><testsuite name='old'><testcase name='pass'/></testsuite></testsuites>")
    base = ["--baseline", str(files["a"]), "--junit", str(junit)]
    cases = [
        ([*base, "--candidate", str(files["a_onnx"]), "--data", str(files["unlabeled"])], "labeled"),
        ([*base, "--candidate", str(files["seven"]), "--data", str(eval_npz)], "different numbers of classes"),
        ([*base, "--candidate", str(files["relu"]), "--data", str(eval_npz)], "not an image classifier"),
    ]
    for args, message in cases:
        r = cli.invoke(app, ["gate", *args])
        assert r.exit_code == 1, (args, r.stderr)
        assert message in r.stderr and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
        suite = ET.parse(junit).getroot().find("testsuite")
        assert suite.get("errors") == "1" and message in suite.find("testcase/error").get("message")
        assert suite.find("testcase/failure") is None
    junit.unlink()
    r = cli.invoke(app, ["gate", "--candidate", str(files["a"]), "--data", str(eval_npz), "--junit", str(junit)])
    assert r.exit_code == 2 and "needs a reference" in r.stderr  # a usage error, like the others
    assert not junit.exists()
    before = files["a_onnx"].read_bytes()
    r = cli.invoke(app, ["gate", "--baseline", str(files["a"]), "--candidate", str(files["a_onnx"]), "--data",
                         str(eval_npz), "--save-metrics", str(files["a_onnx"])])
    assert r.exit_code == 1 and "same file as input" in r.stderr
    assert files["a_onnx"].read_bytes() == before


def test_runaway_threads_and_warmup_are_usage_errors(files, eval_npz):
    """--threads 100000 hung ONNX Runtime (32,000 threads) or made torch fail to load a library;
    --warmup inf never ended."""
    for args in (["evaluate", str(files["a_onnx"]), "--data", str(eval_npz), "--threads", "100000"],
                 ["benchmark", str(files["a"]), str(files["a_onnx"]), "--data", str(eval_npz), "--warmup", "inf"],
                 ["gate", "--baseline", str(files["a"]), "--candidate", str(files["a_onnx"]), "--data",
                  str(eval_npz), "--warmup", "inf"]):
        r = cli.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
    r = cli.invoke(app, ["evaluate", str(files["a_onnx"]), "--data", str(eval_npz), "--threads", "100000"])
    assert "more than this machine can use" in r.stderr


def test_benchmark_refuses_a_batch_size_given_twice(files):
    """--batch 2,2 measured batch 2 twice, and the tables showed the first measurement on both rows."""
    r = cli.invoke(app, ["benchmark", str(files["a_onnx"]), "--batch", "1,2,2", *TIMING])
    assert r.exit_code == 2 and "--batch lists 2 more than once" in r.stderr


def test_unknown_runtimes_are_refused_for_torch_files_too(files, eval_npz):
    r = cli.invoke(app, ["gate", "--baseline", str(files["a"]), "--candidate", str(files["noisy"]), "--data",
                         str(eval_npz), "--limit", "50", "--runtime", "bogus"])
    assert r.exit_code == 2 and "unknown runtime 'bogus'" in r.stderr
    r = cli.invoke(app, ["benchmark", str(files["a"]), f"{files['a_onnx']}@bogus", "--data", str(eval_npz),
                         "--limit", "50"])
    assert r.exit_code == 2 and "unknown runtime 'bogus' in" in r.stderr


@pytest.mark.needs_openvino
def test_benchmark_same_onnx_in_two_runtimes(files, eval_npz):
    onnx_path = str(files["a_onnx"])
    r = cli.invoke(app, ["benchmark", onnx_path, f"{onnx_path}@openvino", "--data", str(eval_npz), "--batch", "1",
                         "--json", *FAST, *TIMING])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert [m["label"] for m in d["models"]] == ["a.onnx@onnxruntime", "a.onnx@openvino"]
    assert [m["runtime"] for m in d["models"]] == ["onnxruntime", "openvino"]
    assert d["models"][1]["agreement"]["top1_agreement"] == 100.0
    assert d["models"][1]["agreement"]["sqnr_db"] > 60.0  # both FP32


def test_device_cuda_without_a_gpu_is_a_clear_error(files, eval_npz):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--device", "cuda"])
    assert r.exit_code == 1 and "no CUDA device" in r.stderr
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--device", "tpu"])
    assert r.exit_code == 1 and "device must be 'cpu' or 'cuda'" in r.stderr


def test_gate_outputs_never_replace_inputs_and_are_checked_before_work(files, eval_npz, tmp_path):
    """FILE@RUNTIME names the same file; a file of the data folder is an input too; an output that cannot
    be written is refused before evaluation, so no other output is left behind."""
    import shutil

    cand = tmp_path / "cand.onnx"
    shutil.copy(files["a_onnx"], cand)
    before = cand.read_bytes()
    r = cli.invoke(app, ["gate", "--candidate", f"{cand}@onnxruntime", "--baseline", str(files["a"]), "--data",
                         str(eval_npz), "--save-metrics", str(cand)])
    assert r.exit_code == 1 and "same file as input" in r.stderr and cand.read_bytes() == before
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(eval_npz, folder / "val.npz")
    r = cli.invoke(app, ["gate", "--candidate", str(files["a"]), "--baseline", str(files["a"]), "--data",
                         str(folder / "val.npz"), "--junit", str(folder / "val.npz")])
    assert r.exit_code == 1 and "same file as input" in r.stderr
    r = cli.invoke(app, ["gate", "--candidate", str(files["a"]), "--baseline", str(files["a"]), "--data",
                         str(folder), "--save-metrics", str(folder / "more.npz")])  # would join the data set
    assert r.exit_code == 1 and "data file in the input folder" in r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["val.npz"]
    (tmp_path / "adir").mkdir()
    metrics = tmp_path / "m.json"
    r = cli.invoke(app, ["gate", "--candidate", str(files["a"]), "--baseline", str(files["a"]), "--data",
                         str(eval_npz), "--save-metrics", str(metrics), "--junit", str(tmp_path / "adir")])
    assert r.exit_code == 1 and "folder" in r.stderr and "evaluat" not in r.stderr.lower().replace("error", "")
    assert not metrics.exists()
    r = cli.invoke(app, ["benchmark", str(files["a"]), "--data", str(eval_npz), "--report", str(tmp_path / "adir")])
    assert r.exit_code == 1 and "folder" in r.stderr


def test_gate_exit_codes_do_not_change_with_debug_and_failures_end_with_the_verdict(files, eval_npz, monkeypatch):
    args = ["gate", "--baseline", str(files["a"]), "--candidate", str(files["noisy"]), "--data", str(eval_npz),
            "--limit", "100", "--threads", "1"]
    r = cli.invoke(app, args)
    assert r.exit_code == 3 and _last_line(r.stdout).startswith("FAILED: ") and r.stderr.count("Error") == 0
    monkeypatch.setenv("RESCOMPRESS_DEBUG", "1")
    assert cli.invoke(app, args).exit_code == 3
    r = cli.invoke(app, [*args, "--min-agreement", "101"])
    assert r.exit_code == 2 and "Traceback" in r.stderr and _last_line(r.stderr).startswith("Error: ")


def test_gate_value_never_rounds_onto_its_threshold():
    from rescompress.measure.gate import check_agreement, check_drop

    c = check_agreement("top1_agreement", 100 * 49498 / 50000, 99.0)  # 98.996
    assert not c.passed and c.shown == "98.996" and "98.996" in c.message
    assert check_agreement("a", 99.0, 99.0).shown == "99"
    assert check_drop("d", 91.0, 90.5, 0.5).shown == "0.5"
    assert check_agreement("a", 99.12345, 99.0).shown == "99.12"
    assert check_drop("d", 1.000012, 0.0, 1.00001).shown == "1.000012"  # "1" would read as passing


def test_nan_logits_are_an_error_in_evaluate_and_record_only_gate(files, eval_npz, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(files["a"]), "pt") as f:  # save_checkpoint would refuse: NaN never matches itself
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["fc.weight"][3] = float("nan")
    nan_file = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_file), metadata=meta)
    r = cli.invoke(app, ["evaluate", str(nan_file), "--data", str(eval_npz), "--limit", "50"])
    assert r.exit_code == 1 and "NaN or Inf" in r.stderr
    r = cli.invoke(app, ["gate", "--candidate", str(nan_file), "--data", str(eval_npz), "--limit", "50",
                         "--save-metrics", str(tmp_path / "m.json")])
    assert r.exit_code == 1 and "NaN or Inf" in r.stderr and not (tmp_path / "m.json").exists()


def test_evaluate_takes_file_at_runtime_and_refuses_onnx_runtimes_for_torch_files(files, eval_npz):
    r = cli.invoke(app, ["evaluate", f"{files['a_onnx']}@onnxruntime", "--data", str(eval_npz), "--limit", "50",
                         "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["runtime"] == "onnxruntime"
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--runtime", "onnxruntime"])
    assert r.exit_code == 2 and "runs ONNX files" in r.stderr
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--preset", "foo"])
    assert r.exit_code == 2 and "unknown preprocessing preset" in r.stderr
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--mean", "0.1,0.2"])
    assert r.exit_code == 2 and "--mean needs 1 value for 1-channel input, got 2" in r.stderr


def test_models_recording_other_normalization_are_not_compared_silently(files, eval_npz, tmp_path):
    """benchmark and gate feed every model one input: a model recording another mean/std would be scored on
    the wrong normalization, so that is refused unless --preset/--mean/--std choose it (then warned)."""
    model, _ = load_checkpoint(files["a"])
    other = tmp_path / "other_norm.onnx"
    export_onnx(model, FMNIST.with_overrides(mean=(0.5,), std=(0.25,)), other, arch="resnet20", num_classes=10)
    args = ["benchmark", str(files["a"]), str(other), "--data", str(eval_npz), "--batch", "1", *FAST, *TIMING]
    r = cli.invoke(app, args)
    assert r.exit_code == 1 and "record different preprocessing" in r.stderr and "other_norm.onnx" in r.stderr
    r = cli.invoke(app, [*args, "--mean", "0.2860", "--std", "0.3530"])
    assert r.exit_code == 0, r.stderr
    assert "other_norm.onnx records other preprocessing than the one used" in r.stderr
    r = cli.invoke(app, ["gate", "--baseline", str(files["a"]), "--candidate", str(other), "--data", str(eval_npz),
                         "--limit", "50"])
    assert r.exit_code == 1 and "record different preprocessing" in r.stderr
    r = cli.invoke(app, ["evaluate", str(files["a"]), "--data", str(eval_npz), "--mean", "123.675", "--std",
                         "58.395"])
    assert r.exit_code == 2 and "--mean 0.485" in r.stderr


def test_input_size_alone_is_not_other_normalization(tmp_path):
    """--input-size rescales an ImageNet preset's resize: the model's own mean/std are still used, so this
    is not a preprocessing conflict (it was refused with two identical lists)."""
    from torchvision.models import resnet18

    torch.save(resnet18(num_classes=10).eval().state_dict(), tmp_path / "r18.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), y=rng.integers(0, 10, 8))
    r = cli.invoke(app, ["benchmark", str(tmp_path / "r18.pt"), "--data", str(tmp_path / "d.npz"), "--input-size",
                         "64", "--batch", "1", "--threads", "1", *TIMING])
    assert r.exit_code == 0, r.stderr
