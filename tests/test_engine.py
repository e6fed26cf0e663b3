"""TensorRT engine stage: profiles, preflight on real ONNX graphs, sidecar checks, the build-engine CLI.

Everything that does not need TensorRT runs here against real ONNX graphs (validated by running them in
onnxruntime) and a real exported ResNet-20. Tests that build and run engines are marked
``needs_tensorrt`` and skip where TensorRT or a CUDA GPU is missing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from rescompress.cli.app import app
from rescompress.engine import (
    INSTALL_HINT,
    BuildEnvironment,
    EngineBuildConfig,
    EngineMetadata,
    EngineMetadataError,
    EngineMismatchError,
    EnginePreflightError,
    ProfileError,
    ProfileSpec,
    TensorRTNotAvailable,
    check_compatibility,
    choose_profile,
    find_calib_cache,
    inspect_onnx,
    load_engine,
    parse_profile,
    parse_profiles,
    plan_batches,
    preflight,
    read_calib_cache,
    read_sidecar,
    require_ready,
    sidecar_path,
    tensorrt_available,
    write_sidecar,
)
from rescompress.engine.metadata import mismatch_message
from rescompress.engine.tensorrt import verify_engine_file
from rescompress.errors import UsageError
from rescompress.fileio import file_sha256
from rescompress.quantization.checker import FLOAT_NODES_KEY

runner = CliRunner()
no_tensorrt = pytest.mark.skipif(tensorrt_available(), reason="checks the behaviour without TensorRT")

FEATURES, CLASSES = 8, 4


# ------------------------------------------------------------------------------------------- graphs
def make_classifier(
    path: Path,
    *,
    qdq: bool = False,
    batch: int | str = "batch",
    channels: int = 1,
    size: int | str = 8,
    opset: int = 17,
    zp_type: int = TensorProto.INT8,
    zp_value: int = 0,
    per_channel: bool = True,
    quantize_input: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, optionally with TensorRT-style Q/DQ.

    Q/DQ placement follows TensorRT's rules: on the activation inputs and the weights of Conv and Gemm
    (weights per-channel on axis 0 where the opset allows it), none on outputs.
    """
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (FEATURES, channels, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, FEATURES).astype(np.float32)
    fw = rng.normal(0, 0.3, (CLASSES, FEATURES)).astype(np.float32)
    fb = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    inits = [numpy_helper.from_array(b, "conv.b"), numpy_helper.from_array(fb, "fc.b")]
    nodes = []
    zp_np = np.uint8 if zp_type == TensorProto.UINT8 else np.int8

    def act_qdq(src: str, name: str, scale: float) -> str:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}.s"))
        inits.append(numpy_helper.from_array(np.array(zp_value, zp_np), f"{name}.zp"))
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}.s", f"{name}.zp"], [f"{name}.q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.zp"], [f"{name}.dq"]))
        return f"{name}.dq"

    def weight_qdq(arr: np.ndarray, name: str) -> str:
        if per_channel:
            scale = (np.abs(arr).reshape(arr.shape[0], -1).max(axis=1) / 127).astype(np.float32)
            bshape = (-1,) + (1,) * (arr.ndim - 1)
            q = np.clip(np.round(arr / scale.reshape(bshape)), -127, 127).astype(np.int8)
            zp = np.zeros(arr.shape[0], np.int8)
            attrs = {"axis": 0}
        else:
            scale = np.array(np.abs(arr).max() / 127, np.float32)
            q = np.clip(np.round(arr / scale), -127, 127).astype(np.int8)
            zp = np.array(0, np.int8)
            attrs = {}
        inits.extend([numpy_helper.from_array(q, f"{name}.q"), numpy_helper.from_array(scale, f"{name}.s"),
                      numpy_helper.from_array(zp, f"{name}.zp")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.zp"],
                                      [f"{name}.dq"], **attrs))
        return f"{name}.dq"

    if qdq:
        x = act_qdq("input", "input_q", 4.0 / 127) if quantize_input else "input"
        conv_w = weight_qdq(w, "conv.w")
    else:
        x = "input"
        inits.append(numpy_helper.from_array(w, "conv.w"))
        conv_w = "conv.w"
    nodes += [
        helper.make_node("Conv", [x, conv_w, "conv.b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
    ]
    if qdq:
        fc_in = act_qdq("flat", "flat_q", 2.0 / 127)
        fc_w = weight_qdq(fw, "fc.w")
    else:
        fc_in = "flat"
        inits.append(numpy_helper.from_array(fw, "fc.w"))
        fc_w = "fc.w"
    nodes.append(helper.make_node("Gemm", [fc_in, fc_w, "fc.b"], ["logits"], transB=1))
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type}_{i}"
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture
def fp32_onnx(tmp_path) -> Path:
    return make_classifier(tmp_path / "tiny.onnx")


@pytest.fixture
def qdq_onnx(tmp_path) -> Path:
    return make_classifier(tmp_path / "tiny.int8.trt.onnx", qdq=True)


def test_test_graphs_are_real_models_that_ort_runs(fp32_onnx, qdq_onnx):
    x = np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32)
    ref = run_ort(fp32_onnx, x)
    quant = run_ort(qdq_onnx, x)
    assert ref.shape == quant.shape == (3, CLASSES)
    # Q/DQ changes the numbers a little, not the model: the int8 grid is fine relative to the logit range.
    assert np.abs(ref - quant).max() < 0.1 * np.abs(ref).max()
    assert not np.array_equal(ref, quant)


# ------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize(
    ("text", "expected"),
    [("1:8:32", (1, 8, 32)), ("8", (8, 8, 8)), (" 2 : 4 : 8 ", (2, 4, 8)), ("1:1:1", (1, 1, 1))],
)
def test_parse_profile(text, expected):
    spec = parse_profile(text)
    assert (spec.min, spec.opt, spec.max) == expected
    assert spec.text == ":".join(map(str, expected))


@pytest.mark.parametrize("text", ["8:1:32", "1:64:32", "0", "0:1:2", "-1:2:3", "1:2", "a:b:c", "", "1:8:32:64", "1::8"])
def test_parse_profile_rejects(text):
    with pytest.raises(ProfileError):
        parse_profile(text)


def test_parse_profiles_lists_and_duplicates():
    assert parse_profiles(["1:1:1", "8:16:32"]) == (ProfileSpec(1, 1, 1), ProfileSpec(8, 16, 32))
    assert parse_profiles("1,4:8:16") == (ProfileSpec(1, 1, 1), ProfileSpec(4, 8, 16))
    with pytest.raises(ProfileError, match="duplicate"):
        parse_profiles(["8", "8:8:8"])
    with pytest.raises(ProfileError):
        parse_profiles([])


def test_profile_shapes_and_round_trip():
    spec = ProfileSpec(1, 8, 32)
    assert spec.shapes((3, 224, 224)) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert ProfileSpec.from_dict(spec.to_dict()) == spec
    assert not spec.is_static and ProfileSpec(4, 4, 4).is_static


def test_choose_profile_prefers_closest_opt():
    profiles = (ProfileSpec(1, 1, 4), ProfileSpec(2, 16, 32))
    assert choose_profile(profiles, 1) == 0
    assert choose_profile(profiles, 3) == 0  # |1-3| < |16-3|
    assert choose_profile(profiles, 12) == 1
    assert choose_profile(profiles, 33) is None


@pytest.mark.parametrize("batch", [1, 5, 16, 32, 70, 100])
def test_plan_batches_covers_every_image_within_profiles(batch):
    profiles = (ProfileSpec(1, 1, 1), ProfileSpec(8, 16, 32))
    chunks = plan_batches(profiles, batch)
    assert chunks[0][0] == 0 and chunks[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    for start, stop, index in chunks:
        assert profiles[index].contains(stop - start)


def test_plan_batches_exact_splits():
    profiles = (ProfileSpec(1, 1, 1), ProfileSpec(8, 16, 32))
    assert plan_batches(profiles, 16) == [(0, 16, 1)]
    assert plan_batches(profiles, 70) == [(0, 32, 1), (32, 64, 1), (64, 65, 0), (65, 66, 0), (66, 67, 0),
                                          (67, 68, 0), (68, 69, 0), (69, 70, 0)]
    with pytest.raises(ProfileError, match="fits none"):
        plan_batches((ProfileSpec(4, 8, 8),), 2)
    with pytest.raises(ProfileError, match="fits none"):
        plan_batches((ProfileSpec(4, 8, 8),), 10)  # 8 runs, the remaining 2 cannot


# ------------------------------------------------------------------------------------------- config
def test_build_config_validation_and_engine_path(tmp_path):
    cfg = EngineBuildConfig(onnx_path=tmp_path / "m.int8.trt.onnx")
    assert cfg.engine_path == tmp_path / "m.int8.trt.engine"
    assert EngineBuildConfig(onnx_path="a.onnx", output="x/y.plan").engine_path == Path("x/y.plan")
    for kwargs, pattern in [
        ({"precision": "int4"}, "--precision"),
        ({"workspace_mib": 0}, "--workspace"),
        ({"optimization_level": 6}, "--opt-level"),
        ({"dla_core": -1}, "--dla-core"),
        ({"profiles": ()}, "at least one"),
    ]:
        with pytest.raises(UsageError, match=pattern):
            EngineBuildConfig(onnx_path="a.onnx", **kwargs)


# ------------------------------------------------------------------------------------------- preflight
def test_inspect_counts_qdq_nodes_exactly(qdq_onnx, fp32_onnx):
    facts = inspect_onnx(qdq_onnx)
    # Two activation Q/DQ pairs (input, fc input) and two weight DQs (conv, fc).
    assert (facts.qdq.quantize, facts.qdq.dequantize) == (2, 4)
    assert facts.qdq.zero_point_types == ("int8",)
    assert facts.qdq.nonzero_zero_points == 0
    assert facts.input_name == "input" and facts.input_dims == ("batch", 1, 8, 8)
    assert facts.outputs == ("logits",) and facts.num_classes == CLASSES and facts.opset == 17
    plain = inspect_onnx(fp32_onnx)
    assert plain.qdq.total == 0 and plain.op_counts["Conv"] == 1 and plain.float_types == ("float32",)


@pytest.mark.parametrize("precision", ["int8", "auto"])
def test_preflight_passes_good_qdq_file(qdq_onnx, precision):
    report = preflight(EngineBuildConfig(qdq_onnx, precision=precision))
    assert report.ok, report.errors
    assert report.precision == "int8"
    assert report.profiles == (ProfileSpec(1, 8, 32),)  # dynamic batch, no --batch: the default range
    assert report.input_chw == (1, 8, 8)
    assert report.qdq.quantize == 2 and report.output_name == "logits"
    require_ready(report)  # does not raise


def test_preflight_refuses_fp32_file_for_int8(fp32_onnx):
    report = preflight(EngineBuildConfig(fp32_onnx, precision="int8"))
    assert not report.ok
    assert len(report.errors) == 1 and "Q/DQ" in report.errors[0] and "has none" in report.errors[0]
    with pytest.raises(EnginePreflightError, match="not ready for an int8 engine"):
        require_ready(report)
    auto = preflight(EngineBuildConfig(fp32_onnx))
    assert auto.ok and auto.precision == "fp32"


def test_preflight_refuses_qdq_file_for_float_precision(qdq_onnx):
    report = preflight(EngineBuildConfig(qdq_onnx, precision="fp32"))
    assert not report.ok and "--precision int8" in report.errors[0]


def test_preflight_static_batch(tmp_path):
    path = make_classifier(tmp_path / "static.onnx", batch=1)
    refused = preflight(EngineBuildConfig(path, profiles=(ProfileSpec(1, 8, 32),)))
    assert not refused.ok and "static batch of 1" in refused.errors[0]
    default = preflight(EngineBuildConfig(path))
    assert default.ok and default.profiles == (ProfileSpec(1, 1, 1),)
    four = make_classifier(tmp_path / "static4.onnx", batch=4)
    assert preflight(EngineBuildConfig(four, profiles=parse_profiles("4"))).ok
    assert not preflight(EngineBuildConfig(four, profiles=parse_profiles("1:4:4"))).ok


def test_preflight_refuses_opset_12_qdq(tmp_path):
    # Per-tensor weights keep this a valid opset-12 model (ORT runs it); TensorRT's Q/DQ needs opset 13.
    path = make_classifier(tmp_path / "old.onnx", qdq=True, opset=12, per_channel=False)
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert run_ort(path, x).shape == (2, CLASSES)
    report = preflight(EngineBuildConfig(path, precision="int8"))
    assert not report.ok and report.opset == 12
    assert len(report.errors) == 1 and "opset 12" in report.errors[0] and ">= 13" in report.errors[0]


def test_preflight_refuses_unsigned_and_nonzero_zero_points(tmp_path):
    u8 = make_classifier(tmp_path / "u8.onnx", qdq=True, zp_type=TensorProto.UINT8, zp_value=128)
    assert run_ort(u8, np.zeros((1, 1, 8, 8), np.float32)).shape == (1, CLASSES)
    report = preflight(EngineBuildConfig(u8, precision="int8"))
    assert any("uint8" in e and "signed int8" in e for e in report.errors)
    assert any("non-zero zero point" in e for e in report.errors)
    shifted = make_classifier(tmp_path / "shifted.onnx", qdq=True, zp_value=3)
    errors = preflight(EngineBuildConfig(shifted, precision="int8")).errors
    # 2 activation Q + 2 activation DQ nodes carry the shifted zero point; weight zero points stay 0.
    assert errors == ("4 Q/DQ nodes have a non-zero zero point; TensorRT needs 0",)


def test_preflight_dynamic_spatial_dims_need_metadata(tmp_path):
    bare = make_classifier(tmp_path / "hw.onnx", size="hw")
    report = preflight(EngineBuildConfig(bare))
    assert not report.ok and "not fixed" in report.errors[0]
    pre = {"preset": "x", "size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.5], "resize": None}
    tagged = make_classifier(tmp_path / "hw_meta.onnx", size="hw",
                             metadata={"rescompress.preprocess": json.dumps(pre)})
    ok = preflight(EngineBuildConfig(tagged))
    assert ok.ok and ok.input_chw == (1, 8, 8)


def test_preflight_dla_needs_reduced_precision(fp32_onnx, qdq_onnx):
    report = preflight(EngineBuildConfig(fp32_onnx, precision="fp32", dla_core=0))
    assert any("DLA runs only FP16 and INT8" in e for e in report.errors)
    dla = EngineBuildConfig(qdq_onnx, precision="int8", dla_core=0, profiles=parse_profiles("8"))
    report = preflight(dla)
    assert report.ok and not report.warnings
    # NVIDIA: 10.7 was the last 10.x with DLA, none in 11.0-11.3; 11.4.1 brought it back (AGX Orin, JetPack 7.2.2+).
    for version, warned in (("10.3.0.30", False), ("10.7.0.23", False), ("10.8.0.43", True), ("11.3.0.7", True),
                            ("11.4.0", True), ("11.4.1.5", False)):
        report = preflight(dla, tensorrt_version=version)
        assert report.ok and any("no DLA support" in w for w in report.warnings) == warned, version


def test_preflight_refuses_tensorrt_before_10(qdq_onnx):
    """TensorRT 8.6 (JetPack 6.0) has no strongly typed networks: its parser would reject the network."""
    report = preflight(EngineBuildConfig(qdq_onnx, precision="int8"), tensorrt_version="8.6.2.3")
    assert not report.ok and any("TensorRT 8.6.2.3 is too old" in e for e in report.errors)
    assert preflight(EngineBuildConfig(qdq_onnx, precision="int8"), tensorrt_version="10.3.0").ok


def test_preflight_fp16_depends_on_tensorrt_version(fp32_onnx):
    cfg = EngineBuildConfig(fp32_onnx, precision="fp16")
    assert preflight(cfg, tensorrt_version="10.8.0.43").ok
    on11 = preflight(cfg, tensorrt_version="11.0.0")
    assert not on11.ok and "ModelOpt AutoCast" in on11.errors[0]


def test_preflight_runs_the_quantize_stage_placement_checker(qdq_onnx, tmp_path):
    assert preflight(EngineBuildConfig(qdq_onnx, precision="int8")).qdq_checker == "passed"
    # Weights quantized but the first conv's activation left in float: TensorRT builds it, that conv in
    # higher precision, so the preflight warns and names it.
    partial = make_classifier(tmp_path / "partial.onnx", qdq=True, quantize_input=False)
    assert run_ort(partial, np.zeros((1, 1, 8, 8), np.float32)).shape == (1, CLASSES)
    report = preflight(EngineBuildConfig(partial, precision="int8"))
    assert report.qdq_checker == "passed" and report.ok
    assert any("higher precision" in w and "'input'" in w for w in report.warnings)
    # Recorded as kept float on purpose (what quantize --exclude writes): no warning either.
    conv = next(n.name for n in onnx.load(str(partial)).graph.node if n.op_type == "Conv")
    recorded = make_classifier(tmp_path / "recorded.onnx", qdq=True, quantize_input=False,
                               metadata={FLOAT_NODES_KEY: json.dumps([conv])})
    report = preflight(EngineBuildConfig(recorded, precision="int8"))
    assert report.ok and not any("higher precision" in w for w in report.warnings)
    # Per-channel weight scales on the wrong axis: TensorRT cannot import that, so the build refuses.
    m = onnx.load(str(qdq_onnx))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "conv.w.q")
    next(a for a in dq.attribute if a.name == "axis").i = 1
    onnx.save(m, str(tmp_path / "axis.onnx"))
    report = preflight(EngineBuildConfig(tmp_path / "axis.onnx", precision="int8"))
    assert report.qdq_checker == "failed" and not report.ok
    assert any(e.startswith("TensorRT Q/DQ placement:") and "axis 0" in e for e in report.errors)


# ------------------------------------------------------------------------------------------- calibration cache
def write_cache(path: Path, scales: dict[str, float], header: str = "TRT-100800-EntropyCalibration2") -> Path:
    lines = [header] + [f"{name}: {struct.pack('>f', value).hex()}" for name, value in scales.items()]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def test_read_calib_cache_decodes_big_endian_float_hex(tmp_path):
    scales = {"input": 0.0314960629, "conv": 0.0123, "logits": 1.5}
    cache = read_calib_cache(write_cache(tmp_path / "c.cache", scales))
    assert cache.algorithm == "EntropyCalibration2" and cache.version_tag == "100800"
    assert cache.scales == {k: np.float32(v).item() for k, v in scales.items()}
    (tmp_path / "bad.cache").write_text("not a cache\n")
    with pytest.raises(EnginePreflightError, match="not a TensorRT calibration cache"):
        read_calib_cache(tmp_path / "bad.cache")


def test_int8_implicit_path(tmp_path):
    onnx_path = make_classifier(tmp_path / "tiny.onnx")
    cfg = EngineBuildConfig(onnx_path, precision="int8-implicit")
    missing = preflight(cfg, tensorrt_version="10.8.0")
    assert not missing.ok and "--calib-cache" in missing.errors[0]

    cache = write_cache(tmp_path / "tiny.trt.calib.cache", {"input": 0.03, "conv": 0.02, "relu": 0.02})
    assert find_calib_cache(onnx_path) == cache
    found = preflight(cfg, tensorrt_version="10.8.0")
    assert found.ok and found.calib_cache == cache
    assert any("deprecated since TensorRT 10.1" in w for w in found.warnings)

    on11 = preflight(cfg, tensorrt_version="11.0.0")
    assert any("needs TensorRT 10" in e for e in on11.errors)
    newer = preflight(cfg, tensorrt_version="10.9.1")
    assert newer.ok and any("TRT-100800" in w and "100901" in w for w in newer.warnings)
    # What the build hands TensorRT 10.9.1: the same scales, bit for bit, under its own version's header.
    retagged = read_calib_cache(cache).retagged("10.9.1.4")
    assert retagged.splitlines()[0] == b"TRT-100901-EntropyCalibration2"
    again = tmp_path / "retagged.cache"
    again.write_bytes(retagged)
    assert read_calib_cache(again).scales == read_calib_cache(cache).scales
    assert retagged.splitlines()[1:] == cache.read_bytes().splitlines()[1:]

    other = write_cache(tmp_path / "other.cache", {"layer9": 0.1})
    foreign = preflight(EngineBuildConfig(onnx_path, precision="int8-implicit", calib_cache=other), "10.8.0")
    assert any("another model" in e for e in foreign.errors)
    # Another model that shares some tensor names (ResNets share many): foreign names plus missing ones.
    shared = write_cache(tmp_path / "shared.cache", {"input": 0.03, "conv": 0.02, "layer9": 0.1})
    mixed = preflight(EngineBuildConfig(onnx_path, precision="int8-implicit", calib_cache=shared), "10.8.0")
    assert not mixed.ok and any("does not match this graph" in e and "1 of its 3" in e for e in mixed.errors)
    # This graph's tensors plus names TensorRT adds itself: fine, with a warning.
    extra = write_cache(tmp_path / "extra.cache", {"input": 0.03, "conv": 0.02, "relu": 0.02, "pool": 0.02,
                                                    "flat": 0.02, "logits": 0.1, "(Unnamed Layer* 3)": 0.1})
    ok = preflight(EngineBuildConfig(onnx_path, precision="int8-implicit", calib_cache=extra), "10.8.0")
    assert ok.ok and any("not in the graph" in w for w in ok.warnings)

    qdq = make_classifier(tmp_path / "q.onnx", qdq=True)
    mixed = preflight(EngineBuildConfig(qdq, precision="int8-implicit", calib_cache=cache), "10.8.0")
    assert any("only the int8 precision builds" in e for e in mixed.errors)


def test_find_calib_cache_ignores_ambiguous_and_non_caches(tmp_path):
    onnx_path = make_classifier(tmp_path / "net.onnx")
    (tmp_path / "net.calib.txt").write_text("hello")
    assert find_calib_cache(onnx_path) is None
    write_cache(tmp_path / "net.a.cache", {"input": 0.1})
    write_cache(tmp_path / "net.b.cache", {"input": 0.1})
    assert find_calib_cache(onnx_path) is None  # two candidates: the user must choose


# ------------------------------------------------------------------------------------------- exported model
def test_preflight_on_exported_resnet20(tmp_path):
    from rescompress.export import export_onnx
    from rescompress.models import build_model
    from rescompress.spec import get_preset

    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    pre = get_preset("fashion-mnist")
    path = export_onnx(model, pre, tmp_path / "r20.onnx", arch="resnet20", num_classes=10,
                       check_parity=False).path
    report = preflight(EngineBuildConfig(path, profiles=parse_profiles("1:8:32")))
    assert report.ok, report.errors
    assert report.precision == "fp32" and report.input_chw == (1, *pre.size)
    assert report.num_classes == 10 and report.arch == "resnet20"
    assert report.input_dims[0] not in (1, None) and not isinstance(report.input_dims[0], int)
    refused = preflight(EngineBuildConfig(path, precision="int8"))
    assert not refused.ok


@pytest.fixture(scope="module")
def quantized_resnet20(tmp_path_factory, calib_npz):
    """The quantize stage's real artifacts for a random-init ResNet-20 (a few calibration images)."""
    from rescompress.export import export_onnx
    from rescompress.models import build_model
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model
    from rescompress.spec import get_preset

    d = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    fp32 = export_onnx(model, get_preset("fashion-mnist"), d / "r20.onnx", arch="resnet20", num_classes=10,
                       check_parity=False).path
    cfg = QuantizeConfig(method="max", num_images=32, batch_size=16, latency=False, eval_limit=32)
    return quantize_model(fp32, calib_npz, d / "out", config=cfg).artifacts


def test_preflight_accepts_the_quantize_stage_tensorrt_artifact(quantized_resnet20):
    report = preflight(EngineBuildConfig(quantized_resnet20["tensorrt"], profiles=parse_profiles("1:8:32")))
    assert report.ok, report.errors
    assert report.precision == "int8" and report.qdq_checker == "passed"
    assert report.qdq.quantize > 0 and report.qdq.zero_point_types == ("int8",)
    assert report.input_chw == (1, 28, 28) and report.num_classes == 10


def test_preflight_refuses_the_onnxruntime_artifact_for_tensorrt(quantized_resnet20):
    report = preflight(EngineBuildConfig(quantized_resnet20["onnxruntime"], precision="int8"))
    assert not report.ok and "ONNX Runtime artifact" in report.errors[0]


def test_preflight_implicit_path_with_the_quantize_stage_cache(quantized_resnet20):
    cfg = EngineBuildConfig(quantized_resnet20["fp32"], precision="int8-implicit",
                            calib_cache=quantized_resnet20["trt_cache"])
    on10 = preflight(cfg, tensorrt_version="10.0.0")
    assert on10.ok, on10.errors
    assert read_calib_cache(on10.calib_cache).algorithm == "EntropyCalibration2"
    assert not preflight(cfg, tensorrt_version="11.0.0").ok


# ------------------------------------------------------------------------------------------- sidecar
def make_meta(engine_sha: str = "0" * 64, trt: str = "10.8.0.43", gpu: str = "NVIDIA A100-SXM4-80GB",
              cc: tuple[int, int] = (8, 0)) -> EngineMetadata:
    return EngineMetadata(
        environment=BuildEnvironment(trt, gpu, cc),
        precision="int8",
        profiles=(ProfileSpec(1, 8, 32), ProfileSpec(64, 64, 64)),
        input_name="input",
        input_chw=(3, 224, 224),
        output_name="logits",
        onnx_path="out/resnet50.int8.trt.onnx",
        onnx_sha256="a" * 64,
        engine_sha256=engine_sha,
        tool_version="0.1.0",
        built_at="2026-11-26T15:00:00Z",
        build_seconds=42.5,
        num_classes=1000,
        arch="resnet50",
        preprocess={"preset": "imagenet"},
        workspace_mib=2048,
        optimization_level=3,
    )


def test_sidecar_round_trip(tmp_path):
    engine = tmp_path / "m.engine"
    meta = make_meta()
    write_sidecar(sidecar_path(engine), meta)
    assert sidecar_path(engine) == tmp_path / "m.engine.json"
    loaded = read_sidecar(engine)
    assert loaded == meta
    data = json.loads(sidecar_path(engine).read_text())
    assert data["tensorrt_version"] == "10.8.0.43" and data["compute_capability"] == [8, 0]
    assert data["profiles"][1] == {"min": 64, "opt": 64, "max": 64}


def test_sidecar_missing_or_malformed(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(EngineMetadataError, match="missing"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineMetadataError, match="cannot read"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineMetadataError, match="not a rescompress engine sidecar"):
        read_sidecar(engine)
    broken = make_meta().to_dict()
    del broken["profiles"]
    sidecar_path(engine).write_text(json.dumps(broken))
    with pytest.raises(EngineMetadataError, match="incomplete"):
        read_sidecar(engine)


def test_compatibility_detects_mismatches():
    meta = make_meta()
    same = check_compatibility(meta, BuildEnvironment("10.8.0.43", "NVIDIA A100-SXM4-80GB", (8, 0)))
    assert same.ok and same.warnings == ()
    other_trt = check_compatibility(meta, BuildEnvironment("10.9.0.34", "NVIDIA A100-SXM4-80GB", (8, 0)))
    assert not other_trt.ok and "TensorRT 10.8.0.43" in other_trt.errors[0]
    other_gpu = check_compatibility(meta, BuildEnvironment("10.8.0.43", "NVIDIA L4", (8, 9)))
    assert not other_gpu.ok and "sm_80" in other_gpu.errors[0] and "sm_89" in other_gpu.errors[0]
    sibling = check_compatibility(meta, BuildEnvironment("10.8.0.43", "NVIDIA A100-PCIE-40GB", (8, 0)))
    assert sibling.ok and len(sibling.warnings) == 1
    both = check_compatibility(meta, BuildEnvironment("11.0.0", "Orin", (8, 7)))
    assert len(both.errors) == 2
    message = mismatch_message("m.engine", meta, both)
    assert "\n" not in message and "rebuild" in message and "out/resnet50.int8.trt.onnx" in message


def test_sidecar_must_describe_this_engine(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized plan bytes")
    verify_engine_file(engine, make_meta(engine_sha=file_sha256(engine)))
    with pytest.raises(EngineMismatchError, match="describes another engine"):
        verify_engine_file(engine, make_meta(engine_sha="f" * 64))


@no_tensorrt
def test_load_engine_without_tensorrt_says_how_to_install(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    write_sidecar(sidecar_path(engine), make_meta(engine_sha=file_sha256(engine)))
    with pytest.raises(TensorRTNotAvailable) as exc:
        load_engine(engine)
    assert str(exc.value) == INSTALL_HINT


def test_runtime_table_routes_engines_to_tensorrt(tmp_path, fp32_onnx):
    from rescompress.errors import RescompressError
    from rescompress.runtimes import make_runner, resolve_runtime

    assert resolve_runtime("m.engine") == "tensorrt" and resolve_runtime("m.plan") == "tensorrt"
    with pytest.raises(RescompressError, match="build an engine first"):
        make_runner(fp32_onnx, runtime="tensorrt")
    with pytest.raises(RescompressError, match="runs engine files"):
        make_runner(torch.nn.Linear(2, 2), runtime="tensorrt")


@no_tensorrt
def test_runner_without_tensorrt_says_how_to_install(tmp_path):
    from rescompress.runtimes import make_runner

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(TensorRTNotAvailable, match="pip install rescompress\\[tensorrt\\]"):
        make_runner(engine)


# ------------------------------------------------------------------------------------------- CLI
@no_tensorrt
def test_cli_without_tensorrt_exits_1_with_one_line(qdq_onnx):
    result = runner.invoke(app, ["build-engine", str(qdq_onnx), "--batch", "1:8:32"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: TensorRT is not installed")
    assert "pip install rescompress[tensorrt]" in lines[-1] and "JetPack" in lines[-1]
    assert len([ln for ln in lines if ln.startswith("Error:")]) == 1
    assert not (qdq_onnx.parent / "tiny.int8.trt.engine").exists()


def test_cli_refuses_bad_file_before_asking_for_tensorrt(fp32_onnx):
    result = runner.invoke(app, ["build-engine", str(fp32_onnx), "--precision", "int8"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "Q/DQ" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_check_only_ready_file(qdq_onnx):
    result = runner.invoke(app, ["build-engine", str(qdq_onnx), "--check-only", "--batch", "1:8:32",
                                 "--batch", "64", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["precision"] == "int8"
    assert data["profiles"] == [{"min": 1, "opt": 8, "max": 32}, {"min": 64, "opt": 64, "max": 64}]
    assert data["qdq"]["QuantizeLinear"] == 2 and data["qdq"]["DequantizeLinear"] == 4
    human = runner.invoke(app, ["build-engine", str(qdq_onnx), "--check-only"])
    assert human.exit_code == 0 and "PASSED" in human.stdout


def test_cli_check_only_not_ready(tmp_path):
    static = make_classifier(tmp_path / "static.onnx", batch=1)
    result = runner.invoke(app, ["build-engine", str(static), "--check-only", "--batch", "1:8:32", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "static batch of 1" in result.stderr
    human = runner.invoke(app, ["build-engine", str(static), "--check-only", "--batch", "1:8:32"])
    assert human.exit_code == 1 and "FAILED" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--batch", "8:1:32"], "min <= opt <= max"), (["--precision", "int4"], "--precision"),
     (["--batch", "x"], "must contain integers")],
)
def test_cli_bad_options(qdq_onnx, args, message):
    result = runner.invoke(app, ["build-engine", str(qdq_onnx), "--check-only", *args])
    assert result.exit_code == 2 and message in result.stderr


def test_cli_refuses_to_overwrite_its_input(qdq_onnx):
    before = qdq_onnx.read_bytes()
    result = runner.invoke(app, ["build-engine", str(qdq_onnx), "-o", str(qdq_onnx)])
    assert result.exit_code == 1 and "same file as input" in result.stderr
    assert qdq_onnx.read_bytes() == before


def test_cli_missing_file(tmp_path):
    result = runner.invoke(app, ["build-engine", str(tmp_path / "nope.onnx"), "--check-only"])
    assert result.exit_code == 1 and "does not exist" in result.stderr


# ------------------------------------------------------------------------------------------- with TensorRT
@pytest.mark.needs_tensorrt
def test_build_fp32_engine_matches_onnxruntime(tmp_path):
    from rescompress.engine import build_engine
    from rescompress.export import export_onnx
    from rescompress.models import build_model
    from rescompress.runtimes.tensorrt_runner import TensorRTRunner
    from rescompress.spec import get_preset

    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    pre = get_preset("fashion-mnist")
    onnx_path = export_onnx(model, pre, tmp_path / "r20.onnx", arch="resnet20", num_classes=10).path
    cache = tmp_path / "timing.cache"
    result = build_engine(EngineBuildConfig(onnx_path, profiles=parse_profiles(["1:4:8", "16:16:16"]),
                                            precision="fp32", workspace_mib=512, timing_cache=cache))
    assert result.engine_path == tmp_path / "r20.engine" and result.engine_path.stat().st_size > 0
    assert cache.stat().st_size > 0
    meta = read_sidecar(result.engine_path)
    assert meta.engine_sha256 == file_sha256(result.engine_path)
    assert meta.onnx_sha256 == file_sha256(onnx_path) and meta.precision == "fp32"

    trt_runner = TensorRTRunner(result.engine_path)
    assert trt_runner.profiles == (ProfileSpec(1, 4, 8), ProfileSpec(16, 16, 16))
    x = torch.randn(21, *pre.input_shape(1)[1:]).numpy()  # 16 + 5 chunks: both profiles run
    got = trt_runner.run(x)
    ref = run_ort(onnx_path, x)
    assert got.shape == ref.shape == (21, 10)
    # TF32 may be used for FP32 convolutions on Ampere+; tolerance relative to the logit scale.
    assert np.abs(got - ref).max() <= 1e-2 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.needs_tensorrt
def test_build_int8_engine_from_qdq_matches_onnxruntime(tmp_path):
    from rescompress.engine import build_engine
    from rescompress.runtimes.tensorrt_runner import TensorRTRunner

    onnx_path = make_classifier(tmp_path / "tiny.int8.trt.onnx", qdq=True, size=16)
    result = build_engine(EngineBuildConfig(onnx_path, profiles=parse_profiles("1:8:32"), precision="int8"))
    assert read_sidecar(result.engine_path).precision == "int8"
    x = np.random.default_rng(2).normal(size=(8, 1, 16, 16)).astype(np.float32)
    got = TensorRTRunner(result.engine_path).run(x)
    ref = run_ort(onnx_path, x)
    # Same int8 grid on both sides; rounding of fused int8 kernels differs by at most a few steps.
    assert np.abs(got - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())


@pytest.mark.needs_tensorrt
def test_load_engine_refuses_tampered_sidecar(tmp_path):
    from rescompress.engine import build_engine

    onnx_path = make_classifier(tmp_path / "tiny.onnx")
    result = build_engine(EngineBuildConfig(onnx_path, profiles=parse_profiles("1:2:4")))
    data = json.loads(result.sidecar_path.read_text())
    data["tensorrt_version"] = "0.0.1"
    result.sidecar_path.write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="TensorRT 0.0.1"):
        load_engine(result.engine_path)


@pytest.mark.needs_tensorrt
def test_int8_engine_from_quantize_artifact_agrees_with_onnxruntime(quantized_resnet20, calib_npz):
    from rescompress.engine import build_engine
    from rescompress.runtimes.tensorrt_runner import TensorRTRunner

    trt_onnx = quantized_resnet20["tensorrt"]
    result = build_engine(EngineBuildConfig(trt_onnx, profiles=parse_profiles("1:8:32")))
    from rescompress.spec import get_preset

    pre = get_preset("fashion-mnist")
    x = np.load(calib_npz)["x"][:32].astype(np.float32)[:, None] / 255.0
    x = ((x - pre.mean[0]) / pre.std[0]).astype(np.float32)
    got = TensorRTRunner(result.engine_path).run(x)
    ref = run_ort(trt_onnx, x)
    # Both execute the same Q/DQ graph; TensorRT's fused int8 kernels round differently in places.
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).max() <= 0.1 * max(1.0, np.abs(ref).max())


def test_check_only_reads_a_file_with_external_data_from_another_folder(qdq_onnx, tmp_path, monkeypatch):
    """torch >= 2.9 exports weights to ``model.onnx.data`` beside the graph; the preflight must find them
    (and the Q/DQ scales stored there too) relative to the file, not to the working folder."""
    m = onnx.load(str(qdq_onnx))
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert (folder / "m.onnx.data").stat().st_size > 0
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["build-engine", str(folder / "m.onnx"), "--check-only", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["qdq"]["QuantizeLinear"] == 2


def test_preflight_catches_what_the_device_build_would_hit(qdq_onnx, fp32_onnx, tmp_path):
    """Missing external weights, int32 biases (third-party Q/DQ), an output over an input, an FP16 file."""
    m = onnx.load(str(fp32_onnx))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(EnginePreflightError, match="keeps its weights in ext.bin, which is not beside it"):
        preflight(EngineBuildConfig(tmp_path / "ext.onnx", precision="fp32"))
    # onnxruntime's quantize_static quantizes biases to int32 by default: one error naming the cause
    q = onnx.load(str(qdq_onnx))
    q.graph.initializer.extend([numpy_helper.from_array(np.zeros(FEATURES, np.int32), "conv.b.q"),
                                numpy_helper.from_array(np.full(FEATURES, 1e-4, np.float32), "conv.b.s"),
                                numpy_helper.from_array(np.zeros(FEATURES, np.int32), "conv.b.zp")])
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    q.graph.node.insert(0, helper.make_node("DequantizeLinear", ["conv.b.q", "conv.b.s", "conv.b.zp"],
                                            ["conv.b.dq"], axis=0))
    conv.input[2] = "conv.b.dq"
    onnx.save(q, str(tmp_path / "bias32.onnx"))
    report = preflight(EngineBuildConfig(tmp_path / "bias32.onnx", precision="int8"))
    assert not report.ok and any("QuantizeBias" in e for e in report.errors)
    assert not any("zero point is int32" in e for e in report.errors)  # not once per node
    same = preflight(EngineBuildConfig(fp32_onnx, precision="fp32", output=fp32_onnx))
    assert not same.ok and any("same file as input" in e for e in same.errors)
    unused = preflight(EngineBuildConfig(fp32_onnx, precision="fp32", calib_cache=tmp_path / "c.cache"))
    assert any("--calib-cache is only read by" in w for w in unused.warnings)
    half = onnx.load(str(fp32_onnx))
    for i, t in enumerate(half.graph.initializer):
        half.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                                                   t.name))
    for v in (*half.graph.input, *half.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(half, str(tmp_path / "half.onnx"))
    assert preflight(EngineBuildConfig(tmp_path / "half.onnx")).precision == "fp16"


def test_build_outputs_never_replace_inputs_and_caches_are_not_guessed(tmp_path):
    """The timing cache and the engine are outputs: neither may be an input (the ONNX, a calibration cache
    found beside it), and the sidecar must be writable; a cache named for another model is not taken
    silently, and two are an error that names them."""
    onnx_path = make_classifier(tmp_path / "m.fp32.onnx")
    scales = {"input": 0.03, "conv": 0.02, "relu": 0.02}
    other = write_cache(tmp_path / "m.pruned.int8.trt.cache", scales)
    implicit = EngineBuildConfig(onnx_path, precision="int8-implicit")
    only = preflight(implicit, "10.8.0")
    assert only.ok and only.calib_cache == other and any("not named for it" in w for w in only.warnings)
    own = write_cache(tmp_path / "m.int8.trt.cache", scales)
    assert preflight(implicit, "10.8.0").calib_cache == own  # the one named for this model wins
    (tmp_path / "m.int8.trt.cache").unlink()
    write_cache(tmp_path / "m.b.cache", scales)
    two = preflight(implicit, "10.8.0")
    assert any("2 calibration caches beside m.fp32.onnx (m.b.cache, m.pruned.int8.trt.cache)" in e
               for e in two.errors)
    (tmp_path / "m.b.cache").unlink()
    over_cache = preflight(EngineBuildConfig(onnx_path, precision="int8-implicit", output=other), "10.8.0")
    assert any("same file as input" in e for e in over_cache.errors)
    over_onnx = preflight(EngineBuildConfig(onnx_path, precision="fp32", timing_cache=onnx_path))
    assert any("same file as input" in e for e in over_onnx.errors)
    (tmp_path / "m.fp32.engine.json").mkdir()
    sidecar = preflight(EngineBuildConfig(onnx_path, precision="fp32"))
    assert any("m.fp32.engine.json" in e and "folder" in e for e in sidecar.errors)


def test_calib_cache_scales_must_be_finite_and_positive(tmp_path):
    onnx_path = make_classifier(tmp_path / "n.onnx")
    for bad in (float("nan"), float("-inf"), 0.0):
        cache = write_cache(tmp_path / "bad.cache", {"input": 0.03, "conv": bad, "relu": 0.02})
        report = preflight(EngineBuildConfig(onnx_path, precision="int8-implicit", calib_cache=cache), "10.8.0")
        assert any("must be finite and positive" in e for e in report.errors), bad


def test_empty_onnx_is_one_clear_error(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(EnginePreflightError, match=r"is empty \(0 bytes\)"):
        preflight(EngineBuildConfig(tmp_path / "e.onnx"))
