"""``rescompress quantize`` end to end through Typer: outputs, JSON, plan reuse, and the error exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from rescompress.checkpoint import CheckpointHeader, load_checkpoint, save_checkpoint
from rescompress.cli.app import app
from rescompress.models import build_model
from rescompress.profile import count_macs
from rescompress.quantization.checker import check_trt_qdq, recorded_float_nodes
from rescompress.spec import get_preset

runner = CliRunner()
FAST = ["--no-latency", "--batch-size", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial BN so folding and ranges matter
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "r20.safetensors"
    save_checkpoint(model, path, CheckpointHeader("resnet20", 10, 1, get_preset("fashion-mnist")))
    return path


@pytest.fixture(scope="module")
def first_run(checkpoint, calib_npz, eval_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = runner.invoke(app, [
        "quantize", str(checkpoint), "--calib-data", str(calib_npz), "--eval-data", str(eval_npz),
        "--num-images", "96", "--eval-limit", "256", "--method", "auto", "-o", str(out), "--json", *FAST,
    ])
    return res, out


def test_quantize_writes_every_artifact(first_run):
    res, out = first_run
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    names = {p.split("/")[-1] for p in data["artifacts"].values()}
    assert names == {
        "r20.fp32.onnx", "r20.int8.ort.onnx", "r20.int8.trt.onnx", "r20.int8.trt.cache", "r20.plan.json",
        "r20.quantize.json", "r20.quantize.md", "r20.weights.npz",
    }
    plan = json.loads((out / "r20.plan.json").read_text())
    assert plan["rounding"]["method"] == "hessian" and plan["rounding"]["file"] == "r20.weights.npz"
    assert data["calibration"]["weight_rounding"]["layers"] == 22  # every conv and the fc
    # Rounding sees only the calibration images: none of the held-out ones, nothing beyond --num-images.
    assert data["calibration"]["holdout"] == 24
    assert data["calibration"]["weight_rounding"]["images"] == 96 - 24
    assert all((out / n).exists() for n in names)
    assert data["method"] in ("max", "percentile", "entropy", "mse")
    # auto scores every method, percentile at 99.99 and 99.999, and reports the ranges it kept
    assert set(data["method_scores"]) == {"max", "percentile 99.99", "percentile 99.999", "entropy", "mse"}
    assert data["ranges"] in data["method_scores"]
    assert data["ranges"] == (f"percentile {data['provenance']['percentile']:.10g}" if data["method"] == "percentile"
                              else data["method"])
    for target in ("onnxruntime", "tensorrt"):
        f = data["fidelity"][target]
        assert f["n"] == 256 and f["top1"] is not None and f["sqnr_db"] > 20.0
        assert len(data["worst_layers"][target]) == 5
    assert data["calibration"]["num_images"] + data["calibration"]["holdout"] == 96
    assert check_trt_qdq(onnx.load(str(out / "r20.int8.trt.onnx"))) == []
    md = (out / "r20.quantize.md").read_text()
    assert "| onnxruntime |" in md and "logit SQNR" in md
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_plan_reuse_skips_calibration(first_run, checkpoint, tmp_path):
    _, out = first_run
    res = runner.invoke(app, [
        "quantize", str(checkpoint), "--plan", str(out / "r20.plan.json"), "--target", "onnxruntime",
        "-o", str(tmp_path), "--json", *FAST,
    ])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["calibration"]["skipped"] is True
    a = onnx.load(str(out / "r20.int8.ort.onnx"))
    b = onnx.load(str(tmp_path / "r20.int8.ort.onnx"))
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    assert not (tmp_path / "r20.int8.trt.onnx").exists()
    assert data["calibration"]["weight_rounding"]["reused"] is True
    assert (tmp_path / "r20.weights.npz").read_bytes() == (out / "r20.weights.npz").read_bytes()


def test_trt_version_sets_the_cache_header(first_run, checkpoint, tmp_path):
    """TensorRT skips a calibration cache tagged for another version: --trt-version names the one that reads it."""
    _, out = first_run
    assert (out / "r20.int8.trt.cache").read_text().splitlines()[0] == "TRT-100000-EntropyCalibration2"
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(out / "r20.plan.json"), "--target",
                              "tensorrt", "--trt-version", "10.8.0", "-o", str(tmp_path / "o"), "--no-latency"])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "o" / "r20.int8.trt.cache").read_text().splitlines()
    assert lines[0] == "TRT-100800-EntropyCalibration2"
    assert lines[1:] == (out / "r20.int8.trt.cache").read_text().splitlines()[1:]
    for bad in ("ten", "7.2.1", "10.x"):
        res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(out / "r20.plan.json"),
                                  "--trt-version", bad, "-o", str(tmp_path / "bad")])
        assert res.exit_code == 2 and "--trt-version" in res.stderr, bad
    assert not (tmp_path / "bad").exists()


def test_plan_is_never_overwritten_and_calibration_options_are_refused(first_run, checkpoint, tmp_path):
    """--plan with -o its own folder would replace the plan (with --weight-rounding nearest, by one that no
    longer points at the rounded weights); calibration options are refused, not silently ignored."""
    _, out = first_run
    plan_dir = tmp_path / "p"
    plan_dir.mkdir()
    for name in ("r20.plan.json", "r20.weights.npz"):
        (plan_dir / name).write_bytes((out / name).read_bytes())
    before = (plan_dir / "r20.plan.json").read_bytes()
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(plan_dir / "r20.plan.json"),
                              "--weight-rounding", "nearest", "-o", str(plan_dir), *FAST])
    assert res.exit_code == 1 and "same file as input" in res.stderr
    assert (plan_dir / "r20.plan.json").read_bytes() == before
    assert sorted(p.name for p in plan_dir.iterdir()) == ["r20.plan.json", "r20.weights.npz"]
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(plan_dir / "r20.plan.json"),
                              "--ort-range", "symmetric", "--method", "max", "-o", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 2 and "--method, --ort-range only apply to calibration" in res.stderr
    assert not (tmp_path / "o").exists()


def test_plan_with_missing_or_altered_rounded_weights_is_refused(first_run, checkpoint, tmp_path):
    _, out = first_run
    plan_dir = tmp_path / "p"
    plan_dir.mkdir()
    (plan_dir / "r20.plan.json").write_bytes((out / "r20.plan.json").read_bytes())
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(plan_dir / "r20.plan.json"),
                              "-o", str(tmp_path / "o1"), *FAST])
    assert res.exit_code == 1 and "are missing" in res.stderr and res.stderr.count("Error:") == 1
    (plan_dir / "r20.weights.npz").write_bytes((out / "r20.weights.npz").read_bytes() + b"x")
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(plan_dir / "r20.plan.json"),
                              "-o", str(tmp_path / "o2"), *FAST])
    assert res.exit_code == 1 and "does not match the plan" in res.stderr
    assert not list((tmp_path / "o2").glob("*int8*")) and not list((tmp_path / "o2").glob(".*tmp"))


def test_plan_records_preprocessing_and_exclusions(first_run, checkpoint, calib_npz, tmp_path):
    """Other --mean/--std give other activation ranges: the plan's scales would be silently wrong (2.6 dB);
    a plan made with --exclude is reused with the same layers in float (it has no scales for them)."""
    _, out = first_run
    plan = json.loads((out / "r20.plan.json").read_text())
    assert plan["provenance"]["preprocess"]["mean"] == list(get_preset("fashion-mnist").mean_per_channel)
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(out / "r20.plan.json"), "--mean", "0",
                              "--std", "0.05", "-o", str(tmp_path / "m"), *FAST])
    assert res.exit_code == 1 and "calibrated with other preprocessing (mean" in res.stderr
    assert not (tmp_path / "m").exists()
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(out / "r20.plan.json"), "--input-size",
                              "32", "-o", str(tmp_path / "s"), *FAST])
    assert res.exit_code == 1 and "calibrated at 28x28 input, this run uses 32x32; pass --input-size 28" in res.stderr
    ex = tmp_path / "ex"
    res = runner.invoke(app, ["quantize", str(checkpoint), "--calib-data", str(calib_npz), "--num-images", "32",
                              "--method", "max", "--weight-rounding", "nearest", "--target", "onnxruntime",
                              "--exclude", "*layer1.0*", "-o", str(ex), *FAST])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", str(checkpoint), "--plan", str(ex / "r20.plan.json"), "--target",
                              "onnxruntime", "-o", str(tmp_path / "re"), "--json", *FAST])
    assert res.exit_code == 0, res.output
    assert "keeping in float what the plan's run excluded: *layer1.0*" in res.stderr
    floats = json.loads(res.stdout)["float_nodes"]["onnxruntime"]
    assert floats and all("layer1.0" in n for n in floats)


def test_external_onnx_quantized_with_options_records_its_preprocessing(tmp_path, calib_npz):
    """A user's ONNX without rescompress metadata, quantized with --preset/--input-size: the INT8 files
    record that preprocessing, so evaluate/benchmark read them without options."""
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    path = tmp_path / "ext.onnx"
    torch.onnx.export(model, torch.randn(2, 1, 28, 28), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
    res = runner.invoke(app, ["quantize", str(path), "--preset", "fashion-mnist", "--calib-data", str(calib_npz),
                              "--num-images", "32", "--method", "max", "--weight-rounding", "nearest", "--target",
                              "onnxruntime", "-o", str(tmp_path / "q"), *FAST])
    assert res.exit_code == 0, res.output
    from rescompress.export import read_onnx_info

    info = read_onnx_info(tmp_path / "q" / "ext.int8.ort.onnx")
    assert info.preprocess is not None and info.preprocess.mean == get_preset("fashion-mnist").mean
    res = runner.invoke(app, ["evaluate", str(tmp_path / "q" / "ext.int8.ort.onnx"), "--data", str(calib_npz),
                              "--limit", "32"])
    assert res.exit_code == 0, res.output


def test_plan_for_another_model_is_refused(first_run, calib_npz, tmp_path):
    _, out = first_run
    other = build_model("resnet20", num_classes=10, in_channels=1).eval()
    path = tmp_path / "other.safetensors"
    save_checkpoint(other, path, CheckpointHeader("resnet20", 10, 1, get_preset("fashion-mnist")))
    res = runner.invoke(app, ["quantize", str(path), "--plan", str(out / "r20.plan.json"), "-o", str(tmp_path), *FAST])
    assert res.exit_code == 1
    assert "another model" in res.stderr and res.stderr.count("Error:") == 1


def test_empty_calibration_folder_exits_1(checkpoint, tmp_path):
    empty = tmp_path / "calib"
    empty.mkdir()
    res = runner.invoke(app, ["quantize", str(checkpoint), "--calib-data", str(empty), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "holds no images" in errors[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_failure_after_export_leaves_nothing_behind(checkpoint, calib_npz, tmp_path):
    """An unreadable image is found only while calibrating, after the FP32 export was written: the run
    fails with one line and removes what it wrote; files already in the output folder stay."""
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    x = np.load(calib_npz)["x"]
    for i in range(8):
        Image.fromarray(np.asarray(x[i]).squeeze().astype(np.uint8)).save(calib / f"{i}.png")
    (calib / "zz_broken.png").write_text("not an image")
    for out, existing in ((tmp_path / "new", None), (tmp_path / "old", "notes.txt")):
        if existing:
            out.mkdir()
            (out / existing).write_text("mine")
        res = runner.invoke(app, ["quantize", str(checkpoint), "--calib-data", str(calib), "-o", str(out), *FAST])
        assert res.exit_code == 1
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and "zz_broken.png" in errors[0]
        if existing:
            assert [f.name for f in out.iterdir()] == [existing] and (out / existing).read_text() == "mine"
        else:
            assert not out.exists()


def test_interrupted_run_touches_nothing_in_the_output_folder(first_run, checkpoint, calib_npz, tmp_path):
    """A run interrupted mid-way (here during calibration) keeps an earlier run's outputs whole (none half
    replaced), never removes a file it did not write (a user's, or another run's written meanwhile), and
    removes the folders it created for -o."""
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    _, first = first_run
    out = tmp_path / "o"
    out.mkdir()
    for f in first.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def interrupt(it, total, desc):
        (out / "written_meanwhile.txt").write_text("another run's file")
        raise KeyboardInterrupt

    cfg = QuantizeConfig(num_images=32, method="max", seed=7, latency=False, weight_rounding="nearest")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(checkpoint, calib_npz, out, config=cfg, progress=interrupt)
    after = {f.name: f.read_bytes() for f in out.iterdir()}
    assert after.pop("written_meanwhile.txt") == b"another run's file"
    assert after == before  # no staging folder left, no output replaced
    deep = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(checkpoint, calib_npz, deep, config=cfg, progress=lambda *a: (_ for _ in ()).throw(
            KeyboardInterrupt()))
    assert not (tmp_path / "a").exists()  # both folders it created are gone


def test_nan_weights_exit_1(first_run, calib_npz, tmp_path):
    _, out = first_run
    m = onnx.load(str(out / "r20.fp32.onnx"))
    w = next(i for i in m.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    res = runner.invoke(app, ["quantize", str(bad), "--calib-data", str(calib_npz), "-o", str(tmp_path), *FAST])
    assert res.exit_code == 1
    assert "NaN or Inf" in res.stderr and w.name in res.stderr


def test_few_images_warn_and_go_on(first_run, tmp_path):
    _, out = first_run
    x = np.random.default_rng(0).integers(0, 255, size=(20, 28, 28), dtype=np.uint8)
    small = tmp_path / "small.npz"
    np.savez(small, x=x)  # unlabeled
    res = runner.invoke(app, [
        "quantize", str(out / "r20.fp32.onnx"), "--calib-data", str(small), "--num-images", "100",
        "--method", "max", "--target", "onnxruntime", "-o", str(tmp_path / "o"), "--json", *FAST,
    ])
    assert res.exit_code == 0, res.output
    assert "fewer than --num-images 100" in res.stderr
    data = json.loads(res.stdout)
    assert data["calibration"]["num_images"] == 20
    assert "agreement only" in data["eval_source"] and data["fidelity"]["onnxruntime"]["top1"] is None


def test_impossible_max_drop_exits_3(first_run, calib_npz, tmp_path):
    _, out = first_run
    # Clipping every activation at its 5th percentile wrecks the model; one layer back in float cannot fix it.
    res = runner.invoke(app, [
        "quantize", str(out / "r20.fp32.onnx"), "--calib-data", str(calib_npz), "--num-images", "64",
        "--method", "percentile", "--percentile", "5", "--target", "onnxruntime", "--max-drop", "0.5",
        "--max-fallback", "1", "-o", str(tmp_path), "--json", *FAST,
    ])
    assert res.exit_code == 3, res.output
    assert "no configuration" in res.stderr
    # A CI job reading --json gets one document that says why, with what was tried.
    data = json.loads(res.stdout)
    assert data["passed"] is False and "no configuration" in data["error"]
    fb = data["fallback"]
    assert fb["target"] == "onnxruntime" and fb["max_drop"] == 0.5 and fb["max_float"] == 1
    assert [t["num_float"] for t in fb["tried"]] == [0, 1] and fb["best"]["value"] > 0.5
    assert len(fb["ranking"]) > 1 and all("node" in r for r in fb["ranking"])
    assert not list(tmp_path.glob("*.int8.*.onnx"))  # nothing written for a failed check


def test_unlabeled_eval_data_gives_agreement_and_a_disagreement_budget(first_run, eval_npz, tmp_path):
    """--eval-data without labels: no top-1 numbers (not 0%), and --max-drop bounds disagreement with FP32
    (with dummy labels both top-1s were 0, so any --max-drop passed)."""
    _, out = first_run
    x = np.load(eval_npz)["x"][:96]
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, x=x)
    args = ["quantize", str(out / "r20.fp32.onnx"), "--calib-data", str(unlabeled), "--eval-data", str(unlabeled),
            "--num-images", "64", "--target", "onnxruntime", "--max-fallback", "0", "--weight-rounding", "nearest",
            "-o", str(tmp_path / "o"), "--json", *FAST]
    # Clipping every activation at its 5th percentile changes many predictions: a zero budget fails.
    res = runner.invoke(app, [*args, "--method", "percentile", "--percentile", "5", "--max-drop", "0"])
    assert res.exit_code == 3, res.output
    data = json.loads(res.stdout)
    assert data["fallback"]["metric"] == "disagreement" and data["fallback"]["best"]["value"] > 0
    assert "disagreement with FP32" in res.stderr
    assert data["fallback"]["ranking"] == [] and "ranking" not in res.stderr  # --max-fallback 0: nothing to rank
    res = runner.invoke(app, [*args, "--method", "max", "--max-drop", "100"])  # any disagreement passes
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["fidelity"]["onnxruntime"]["top1"] is None
    fb = data["fallback"]["onnxruntime"]
    assert fb["metric"] == "disagreement" and fb["num_float"] == 0 and fb["ranking"] == []  # met without ranking


def test_bad_target_and_method_exit_2(checkpoint, calib_npz, tmp_path):
    for opts, msg in ((["--target", "gpu"], "--target"), (["--method", "minmax"], "--method")):
        res = runner.invoke(app, ["quantize", str(checkpoint), "--calib-data", str(calib_npz), *opts, "-o",
                                  str(tmp_path)])
        assert res.exit_code == 2 and msg in res.stderr


def test_exclude_keeps_first_conv_float_in_tensorrt_file(first_run, calib_npz, tmp_path):
    _, out = first_run
    res = runner.invoke(app, [
        "quantize", str(out / "r20.fp32.onnx"), "--calib-data", str(calib_npz), "--num-images", "32",
        "--method", "max", "--target", "tensorrt", "--exclude", "/conv1/*", "-o", str(tmp_path), "--json", *FAST,
    ])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["float_nodes"] == {"tensorrt": ["/conv1/Conv"]}
    q = onnx.load(str(tmp_path / "r20.int8.trt.onnx"))
    first = next(n for n in q.graph.node if n.name == "/conv1/Conv")
    assert first.input[0] == "input"  # reads the float input directly
    assert check_trt_qdq(q, allow_float=["/conv1/Conv"]) == []
    assert not (tmp_path / "r20.int8.ort.onnx").exists() and data["latency"] is None
    # The file records what was kept float on purpose, so the engine preflight accepts it as it is.
    assert recorded_float_nodes(q) == ("/conv1/Conv",)
    assert {p.key: p.value for p in q.metadata_props}["rescompress.precision"] == "int8"
    pre = runner.invoke(app, ["build-engine", str(tmp_path / "r20.int8.trt.onnx"), "--check-only", "--json"])
    assert pre.exit_code == 0, pre.output
    assert json.loads(pre.stdout)["errors"] == []


def test_binary_one_logit_model_with_its_two_class_data(calib_npz, tmp_path):
    """A sigmoid classifier (one output) calibrates and evaluates on its labeled 0/1 data; accuracy is
    computed from the logit's sign (it used to be refused: '2 classes but the model outputs 1')."""
    z = np.load(calib_npz)
    np.savez(tmp_path / "bin.npz", x=z["x"][:96], y=(z["y"][:96] >= 5).astype(np.int64))
    torch.manual_seed(0)
    path = save_checkpoint(build_model("resnet20", 1, 1).eval(), tmp_path / "bin.safetensors",
                           CheckpointHeader("resnet20", 1, 1, get_preset("fashion-mnist")))
    res = runner.invoke(app, ["quantize", str(path), "--calib-data", str(tmp_path / "bin.npz"), "--eval-data",
                              str(tmp_path / "bin.npz"), "--num-images", "64", "--method", "max", "-o",
                              str(tmp_path / "o"), "--json", *FAST])
    assert res.exit_code == 0, res.output
    f = json.loads(res.stdout)["fidelity"]["onnxruntime"]
    assert f["top5"] is None and f["n"] == 96
    with torch.no_grad():  # the sign of the logit, computed here from the torch model
        from rescompress.data import open_dataset

        ds = open_dataset(tmp_path / "bin.npz", get_preset("fashion-mnist"))
        x = torch.stack([ds[i][0] for i in range(96)])
        model, _ = load_checkpoint(path)
        expected = 100 * float(((model(x)[:, 0] > 0).long() == torch.tensor([ds[i][1] for i in range(96)]))
                               .double().mean())
    assert abs(f["fp32_top1"] - expected) <= 100 / 96 + 1e-9


def test_torchscript_that_stays_torchscript_is_quantized(calib_npz, tmp_path):
    """A TorchScript archive that cannot be rebuilt as an eager ResNet (here BatchNorm eps 1e-3) stays
    TorchScript, which torch.fx cannot fold: quantize exports it and folds BatchNorm in the ONNX graph."""
    from functools import partial

    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10, norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3)).eval()
    path = tmp_path / "r18.ts.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(path))
    res = runner.invoke(app, ["quantize", str(path), "--calib-data", str(calib_npz), "--channels", "3",
                              "--input-size", "32", "--num-images", "32", "--method", "max", "-o",
                              str(tmp_path / "o"), "--json", *FAST])
    assert res.exit_code == 0, res.output
    fp32 = onnx.load(str(tmp_path / "o" / "r18.ts.fp32.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in fp32.graph.node)
    f = json.loads(res.stdout)["fidelity"]["onnxruntime"]
    assert f["sqnr_db"] > 15.0 and f["n"] > 0


def test_an_int8_file_is_not_quantized_again(first_run, calib_npz, tmp_path):
    _, out = first_run
    for name in ("r20.int8.ort.onnx", "r20.int8.trt.onnx"):
        res = runner.invoke(app, ["quantize", str(out / name), "--calib-data", str(calib_npz), "-o",
                                  str(tmp_path / "o"), *FAST])
        assert res.exit_code == 1 and "is already quantized" in res.stderr and "FP32 model" in res.stderr
    assert not (tmp_path / "o").exists()


def test_exclude_pattern_that_matches_nothing_is_refused(first_run, calib_npz, tmp_path):
    _, out = first_run
    res = runner.invoke(app, ["quantize", str(out / "r20.fp32.onnx"), "--calib-data", str(calib_npz),
                              "--exclude", "/conv1/*", "--exclude", "conv1", "-o", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 2 and "--exclude 'conv1' matches no node" in res.stderr
    assert "'/conv1/Conv'" in res.stderr and not (tmp_path / "o").exists()


def test_prune_then_quantize_at_a_non_square_size(checkpoint, calib_npz, tmp_path):
    """``--input-size HxW``: the pruned file records the size and quantize builds its graphs at it."""
    pruned = tmp_path / "wide.safetensors"
    res = runner.invoke(app, ["prune", str(checkpoint), "--target-macs", "0.6", "--input-size", "24x40",
                              "--no-latency", "-o", str(pruned), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["before"]["macs"] == count_macs(build_model("resnet20", 10, 1), (1, 1, 24, 40))
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(pruned), "--calib-data", str(calib_npz), "--num-images", "32",
                              "--weight-rounding", "nearest", "--refine-tensors", "0", "-o", str(out), "--json", *FAST])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    for target, name in (("onnxruntime", "wide.int8.ort.onnx"), ("tensorrt", "wide.int8.trt.onnx")):
        m = onnx.load(str(out / name))
        dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]
        assert dims == [1, 24, 40], (target, dims)
        assert data["fidelity"][target]["sqnr_db"] > 20.0


def test_calibration_on_a_bigger_labeled_set_ignores_its_labels(checkpoint, calib_npz, tmp_path):
    """Calibration needs images only: a labeled set with more classes than the model (ImageNet folders for a
    10-class fine-tuned model) was refused. Its labels are now ignored, and --method auto compares by agreement."""
    with np.load(calib_npz) as z:
        x, y = z["x"][:64], z["y"][:64].astype(np.int64)
    y[:8] = 11  # 12 classes in the labels, 10 model outputs
    big = tmp_path / "big.npz"
    np.savez(big, x=x, y=y)
    res = runner.invoke(app, ["quantize", str(checkpoint), "--calib-data", str(big), "--num-images", "64",
                              "--target", "onnxruntime", "--refine-tensors", "0", "--weight-rounding", "nearest",
                              "-o", str(tmp_path / "o"), "--json", *FAST])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert any("labels are ignored" in w for w in data["warnings"])
    assert all(s["top1"] is None for s in data["method_scores"].values())  # chosen by agreement, not accuracy


def test_ort_file_runs_a_strided_stem_as_blocks_with_the_same_outputs(calib_npz, eval_npz, tmp_path):
    """resnet18's 7x7 stride-2 stem on 3 channels: the ORT file computes it over 2x2 blocks (SpaceToDepth), and
    its outputs, fidelity and integer kernels are those of the file written with --no-stem-s2d."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3).eval()
    path = tmp_path / "r18.safetensors"
    save_checkpoint(model, path, CheckpointHeader("resnet18", 10, 3, replace(get_preset("imagenet"), size=(64, 64),
                                                                                resize=None)))
    common = ["--calib-data", str(calib_npz), "--eval-data", str(eval_npz), "--eval-limit", "64", "--num-images",
              "32", "--method", "max", "--weight-rounding", "nearest", "--refine-tensors", "0", "--target",
              "onnxruntime", "--json", *FAST]
    runs = {}
    for name, flag in (("blocks", []), ("plain", ["--no-stem-s2d"])):
        res = runner.invoke(app, ["quantize", str(path), *common, *flag, "-o", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        runs[name] = json.loads(res.stdout)
    assert runs["blocks"]["ort_stem_rewrite"] == {"node": "/conv1/Conv", "kernel": [7, 7], "block_kernel": [4, 4],
                                                  "channels": [3, 12]}
    assert runs["plain"]["ort_stem_rewrite"] is None
    files = {k: onnx.load(str(tmp_path / k / "r18.int8.ort.onnx")) for k in runs}
    assert [n.op_type for n in files["blocks"].graph.node].count("SpaceToDepth") == 1
    assert "SpaceToDepth" not in [n.op_type for n in files["plain"].graph.node]
    from rescompress.calibration.collect import make_session
    from rescompress.measure.model_stats import onnx_params_macs
    from rescompress.system import cpu_flags

    # counts take the stem's real taps, not the block kernel's zeros: the files count as the model does
    counts = {k: onnx_params_macs(tmp_path / k / "r18.int8.ort.onnx", (1, 3, 64, 64)) for k in runs}
    assert counts["blocks"] == counts["plain"] and counts["plain"][1] == count_macs(model, (1, 3, 64, 64))
    if cpu_flags() & {"avx512_vnni", "avx_vnni", "asimddp"}:  # exact int32 sums (see tests/test_stem.py)
        assert runs["blocks"]["fidelity"] == runs["plain"]["fidelity"]
        x = np.random.default_rng(0).normal(0, 1, (4, 3, 64, 64)).astype(np.float32)
        out = {k: make_session(m, 1).run(None, {"input": x})[0] for k, m in files.items()}
        np.testing.assert_array_equal(out["blocks"], out["plain"])
