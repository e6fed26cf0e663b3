"""Q/DQ placement and emitters on a real exported ResNet-20, checked by ONNX Runtime's own fused graph.

The model is a random-init ResNet-20 with non-trivial BatchNorm statistics, folded and exported by the
project's export path; the ORT file must turn every quantized Conv into QLinearConv (read from the graph
ORT writes with ``optimized_model_filepath``), the TensorRT file must pass the structural checker (and
deliberately broken variants must not). Fidelity on the trained bundled model is checked when its
weights exist.
"""

from __future__ import annotations

import re
import struct
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from rescompress.calibration.collect import collect_histograms
from rescompress.errors import CheckFailed, RescompressError
from rescompress.export import export_onnx
from rescompress.folding import fold_batchnorm
from rescompress.models import build_model
from rescompress.quantization.calibrate import activation_entries, weight_entries
from rescompress.quantization.checker import check_trt_qdq
from rescompress.quantization.emit import emit_qdq, quantize_weight
from rescompress.quantization.fallback import LayerSensitivity, search_fallback
from rescompress.quantization.fidelity import sqnr_db
from rescompress.quantization.placement import GraphIndex, place, prepare_model
from rescompress.quantization.plan import (
    Provenance,
    QuantPlan,
    activation_entry,
    model_fingerprint,
    symmetric_int8,
    symmetric_uint8,
    unsigned_uint8,
)
from rescompress.quantization.trt_cache import cache_text, parse_cache, trt_version_number
from rescompress.spec import get_preset

NUM_CONVS, NUM_ADDS = 21, 9  # ResNet-20: stem + 18 block convs + 2 downsample convs; one Add per block


def _randomize_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    _randomize_bn(model)
    pre = get_preset("fashion-mnist")
    folded = fold_batchnorm(model, input_shape=pre.input_shape(2)).model
    path = tmp_path_factory.mktemp("q") / "r20.fp32.onnx"
    export_onnx(folded, pre, path, arch="resnet20", num_classes=10)
    return prepare_model(onnx.load(str(path)))


@pytest.fixture(scope="module")
def images(calib_npz):
    from rescompress.data import open_dataset

    ds = open_dataset(calib_npz, get_preset("fashion-mnist"))
    return np.stack([ds[i][0].numpy() for i in range(96)])


@pytest.fixture(scope="module")
def plan(fp32, images):
    placements = [place(fp32, "onnxruntime"), place(fp32, "tensorrt")]
    names = sorted(set().union(*(p.calib_tensors() for p in placements)) | set(GraphIndex(fp32).float_activations()))
    hists, stats = collect_histograms(fp32, names, [images[i : i + 32] for i in range(0, 64, 32)])
    prov = Provenance(model_fingerprint(fp32), "test", stats.num_images, "max", None, {})
    weights = weight_entries(fp32, [w for p in placements for w in p.weights])
    return QuantPlan(activation_entries(hists, "max", 99.99), weights, prov)


def _ort_optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for ``model`` (written by ``optimized_model_filepath``)."""
    src, opt = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(model, str(src))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(opt)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(opt))


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    return Counter(n.op_type for n in _ort_optimized(model, tmp_path).graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


# ------------------------------------------------------------------------------------------ placement
def test_placement_covers_every_conv_and_add(fp32):
    ops = {n.name: n.op_type for n in fp32.graph.node}
    ort_p, trt_p = place(fp32, "onnxruntime"), place(fp32, "tensorrt")
    ort_ops = Counter(ops[n] for n in ort_p.quantized_nodes)
    trt_ops = Counter(ops[n] for n in trt_p.quantized_nodes)
    assert ort_ops["Conv"] == NUM_CONVS and ort_ops["Add"] == NUM_ADDS and ort_ops["Gemm"] == 1
    assert trt_ops["Conv"] == NUM_CONVS and trt_ops["Add"] == NUM_ADDS and trt_ops["Gemm"] == 1
    assert len(ort_p.weights) == len(trt_p.weights) == NUM_CONVS + 1
    assert not ort_p.unsupported and not trt_p.unsupported
    logits = fp32.graph.output[0].name
    assert all(a.name != logits for a in ort_p.activations + trt_p.activations)


def test_exclude_pattern_keeps_layers_float(fp32):
    p = place(fp32, "onnxruntime", exclude=["/conv1/*"])
    assert p.float_nodes == ("/conv1/Conv",)
    assert "/conv1/Conv" not in p.quantized_nodes and len(p.weights) == NUM_CONVS


def test_opset_below_13_is_refused(fp32):
    old = onnx.ModelProto()
    old.CopyFrom(fp32)
    old.opset_import[0].version = 11
    with pytest.raises(RescompressError, match="opset"):
        prepare_model(old)


# ------------------------------------------------------------------------------------------ ORT artifact
def test_ort_file_fuses_every_conv_into_qlinearconv(fp32, plan, tmp_path):
    q = emit_qdq(fp32, plan, place(fp32, "onnxruntime"))
    onnx.checker.check_model(q)
    ops = _optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == NUM_CONVS
    assert ops["QLinearAdd"] == NUM_ADDS
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0 and ops["DequantizeLinear"] == 0
    # uint8 activations everywhere, int8 weights
    zps = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_zero_point")}
    act_zps = [v for k, v in zps.items() if "Conv_" not in k and "Gemm_" not in k]
    assert act_zps and all(v.dtype == np.uint8 for v in act_zps)


def test_ort_exclude_leaves_one_float_conv(fp32, plan, tmp_path):
    q = emit_qdq(fp32, plan, place(fp32, "onnxruntime", exclude=["/conv1/*"]))
    ops = _optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == NUM_CONVS - 1
    assert ops["Conv"] + ops["FusedConv"] == 1


@pytest.mark.parametrize("node", ["/layer1/layer1.0/conv1/Conv", "/layer2/layer2.1/conv2/Conv"])
def test_ort_excluded_middle_conv_stays_float_after_ort_optimizes(fp32, plan, images, tmp_path, node):
    """A float Conv fed by a DequantizeLinear is quantized by ONNX Runtime itself (per-tensor weight):
    an excluded layer must reach ORT's optimized graph as a float Conv with its own float weights."""
    q = emit_qdq(fp32, plan, place(fp32, "onnxruntime", exclude=[node]))
    optimized = _ort_optimized(q, tmp_path)
    kept = [n for n in optimized.graph.node  # ORT may suffix a fused node's name
            if n.name.startswith(node) and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert len(kept) == 1 and kept[0].op_type in ("Conv", "FusedConv"), [n.op_type for n in kept]
    weights = {i.name: numpy_helper.to_array(i) for i in optimized.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    w_name = next(n for n in fp32.graph.node if n.name == node).input[1]
    got_w, want_w = weights[kept[0].input[1]], original[w_name]
    assert got_w.dtype == np.float32  # ORT may reorder (NCHWc) and pad the weights, not change their values
    np.testing.assert_array_equal(np.sort(got_w[got_w != 0]), np.sort(want_w[want_w != 0]))
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["QLinearConv"] >= NUM_CONVS - 3  # at most the producer of its input loses its fusion too
    ref, got = _run(fp32, images[64:96]), _run(q, images[64:96])
    assert sqnr_db(ref, got) > 25.0


def test_ort_file_stays_close_to_fp32(fp32, plan, images):
    x = images[64:96]
    ref = _run(fp32, x)
    got = _run(emit_qdq(fp32, plan, place(fp32, "onnxruntime")), x)
    assert got.shape == ref.shape
    assert sqnr_db(ref, got) > 25.0  # random-init weights, 64 calibration images, max ranges


def test_weights_are_int8_per_channel(fp32, plan):
    q = emit_qdq(fp32, plan, place(fp32, "tensorrt"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    orig = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
           and inits[n.input[0]].dtype == np.int8]
    assert len(dqs) == NUM_CONVS + 1
    for dq in dqs:
        wq, scale = inits[dq.input[0]], inits[dq.input[1]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert scale.shape == (wq.shape[axis],)
        assert wq.min() >= -127 and wq.max() <= 127
    w = orig[next(iter(plan.weights))]
    scales = plan.weights[next(iter(plan.weights))].scales
    wq = quantize_weight(w, scales, 0)
    err = np.abs(wq.astype(np.float32) * scales.reshape(-1, *([1] * (w.ndim - 1))) - w)
    assert float(err.max()) <= float(scales.max()) / 2 + 1e-7


def test_same_grid_for_both_targets():
    assert symmetric_uint8(2.54).scale == symmetric_int8(2.54).scale == pytest.approx(0.02)
    assert symmetric_uint8(2.54).zero_point == 128 and symmetric_int8(2.54).zero_point == 0
    assert unsigned_uint8(2.55).scale == pytest.approx(0.01) and unsigned_uint8(2.55).zero_point == 0


def test_ort_range_modes():
    # A normalized image: min -0.81, max 2.04 -> asymmetric uses the observed range, same clipping as symmetric.
    e = activation_entry("x", "max", -0.81, 2.04, 2.04, None, ort_range="asymmetric")
    p = e.params["onnxruntime"]
    assert p.scale == pytest.approx(2.85 / 255) and p.zero_point == round(0.81 / (2.85 / 255))
    assert e.params["tensorrt"] == symmetric_int8(2.04)
    clipped = activation_entry("x", "entropy", -5.0, 9.0, 4.0, None).params["onnxruntime"]
    assert clipped.scale == pytest.approx(8.0 / 255) and clipped.zero_point == 128  # both sides clipped at amax
    relu = activation_entry("r", "max", 0.0, 3.0, 3.0, 2.55, ort_range="unsigned").params["onnxruntime"]
    assert relu == unsigned_uint8(2.55)
    assert activation_entry("r", "max", 0.0, 3.0, 3.0, 2.55, ort_range="symmetric").params["onnxruntime"] == (
        symmetric_uint8(3.0))
    with pytest.raises(RescompressError, match="ORT range"):
        activation_entry("x", "max", 0.0, 1.0, 1.0, 1.0, ort_range="wide")


# ------------------------------------------------------------------------------------------ TensorRT artifact
def test_trt_file_passes_checker_and_runs(fp32, plan, images):
    p = place(fp32, "tensorrt")
    q = emit_qdq(fp32, plan, p)
    assert check_trt_qdq(q) == []
    ops = Counter(n.op_type for n in q.graph.node)
    # one Q per quantized activation tensor (conv/gemm inputs + residual inputs), a DQ per weight as well
    assert ops["QuantizeLinear"] == len(p.activations)
    assert ops["DequantizeLinear"] == len(p.activations) + NUM_CONVS + 1
    producers = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            src = producers.get(n.input[0])
            assert src is None or src.op_type != "Conv" or "downsample" in src.name
    x = images[64:96]
    assert sqnr_db(_run(fp32, x), _run(q, x)) > 25.0


def test_checker_catches_missing_residual_qdq(fp32, plan):
    q = emit_qdq(fp32, plan, place(fp32, "tensorrt"))
    producers = {o: n for n in q.graph.node for o in n.output}
    add = next(n for n in q.graph.node if n.op_type == "Add" and producers[n.input[1]].op_type == "DequantizeLinear"
               and producers[n.input[0]].op_type == "Conv")
    dq = producers[add.input[1]]
    add.input[1] = producers[dq.input[0]].input[0]  # bypass the residual Q/DQ pair
    problems = check_trt_qdq(q)
    assert any(add.name in p and "residual" in p for p in problems)


def test_checker_catches_qdq_on_conv_output(fp32, plan):
    q = emit_qdq(fp32, plan, place(fp32, "tensorrt"))
    producers = {o: n for n in q.graph.node for o in n.output}
    add = next(n for n in q.graph.node if n.op_type == "Add" and producers[n.input[0]].op_type == "Conv")
    conv_out = add.input[0]
    scale = helper.make_tensor("bad_scale", onnx.TensorProto.FLOAT, [], [0.05])
    zp = helper.make_tensor("bad_zp", onnx.TensorProto.INT8, [], [0])
    q.graph.initializer.extend([scale, zp])
    idx = list(q.graph.node).index(add)
    q.graph.node.insert(idx, helper.make_node("DequantizeLinear", ["bad_q", "bad_scale", "bad_zp"], ["bad_dq"]))
    q.graph.node.insert(idx, helper.make_node("QuantizeLinear", [conv_out, "bad_scale", "bad_zp"], ["bad_q"]))
    add.input[0] = "bad_dq"
    problems = check_trt_qdq(q)
    assert any(add.name in p and "exactly one Conv output" in p for p in problems)


def test_checker_catches_unquantized_conv_and_uint8(fp32, plan):
    q = emit_qdq(fp32, plan, place(fp32, "tensorrt", exclude=["/layer2/layer2.1/conv1/*"]))
    problems = check_trt_qdq(q)
    assert any("/layer2/layer2.1/conv1/Conv" in p and "not quantized" in p for p in problems)
    assert check_trt_qdq(q, allow_float=["/layer2/layer2.1/conv1/Conv"]) == []
    ort_file = emit_qdq(fp32, plan, place(fp32, "onnxruntime"))
    assert any("uint8" in p for p in check_trt_qdq(ort_file))


# ------------------------------------------------------------------------------------------ cache and plan
def test_calibration_cache_format(fp32, plan):
    names = GraphIndex(fp32).float_activations()
    scales = {n: plan.activation(n).params["tensorrt"].scale for n in names}
    text = cache_text(scales, "10.3.0")
    lines = text.splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert all(re.fullmatch(r".+: [0-9a-f]{8}", ln) for ln in lines[1:])
    header, parsed = parse_cache(text)
    assert header == lines[0] and set(parsed) == set(names)
    for n in names:
        assert parsed[n] == struct.unpack(">f", struct.pack(">f", plan.activation(n).amax / 127))[0]
    assert trt_version_number("8.6.1") == 8601 and trt_version_number("10.0.1") == 100001
    assert trt_version_number("10.0.0b6") == 100000 and trt_version_number("10.8.0.43") == 100800


@pytest.mark.parametrize(("installed", "expected"), [("10.0.0b6", "10.0.0"), ("10.8.0.43", "10.8.0"), (None, "10.0.0")])
def test_default_cache_version_follows_the_installed_tensorrt(monkeypatch, installed, expected):
    """A pre-release wheel (10.0.0b6) made every quantize fail: its version was refused as --trt-version."""
    import rescompress.engine.tensorrt as trt_module
    from rescompress.quantization.pipeline import QuantizeConfig
    from rescompress.quantization.trt_cache import default_trt_version

    monkeypatch.setattr(trt_module, "installed_tensorrt_version", lambda: installed)
    assert default_trt_version() == expected
    assert QuantizeConfig(trt_version=default_trt_version()).trt_version == expected


def test_plan_json_round_trip(plan, tmp_path, fp32):
    path = plan.save(tmp_path / "plan.json")
    back = QuantPlan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert back.activations == plan.activations and back.weights == plan.weights
    back.check_model(model_fingerprint(fp32))
    with pytest.raises(RescompressError, match="another model"):
        back.check_model("0" * 64)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(RescompressError, match="not a rescompress quantization plan"):
        QuantPlan.load(tmp_path / "bad.json")


def test_output_names_keep_distinct_models_apart():
    from pathlib import Path

    from rescompress.quantization.pipeline import output_stem

    assert output_stem(Path("out/r20.fp32.onnx")) == "r20"
    assert output_stem(Path("r20.pruned.safetensors")) == "r20.pruned"  # must not overwrite r20's files
    assert output_stem(Path("resnet50.pt")) == "resnet50"


def test_auto_method_choice_ignores_held_out_noise():
    from rescompress.quantization.fidelity import Fidelity
    from rescompress.quantization.pipeline import choose_method

    f = {
        "max": Fidelity(n=100, top1_agreement=99.0, sqnr_db=38.0, max_abs_diff=0.1, top1=91.0, fp32_top1=91.0),
        "entropy": Fidelity(n=100, top1_agreement=98.0, sqnr_db=30.0, max_abs_diff=0.3, top1=92.0, fp32_top1=91.0),
        "mse": Fidelity(n=100, top1_agreement=95.0, sqnr_db=41.0, max_abs_diff=0.1, top1=88.0, fp32_top1=91.0),
    }
    # entropy's one extra correct image does not beat 8 dB of SQNR; mse's 4 fewer are more than the noise of
    # entropy's lead (2 * sqrt(2) departures from FP32 = 2.8 images)
    assert choose_method(f) == "max"
    unlabeled = {k: Fidelity(v.n, v.top1_agreement, v.sqnr_db, v.max_abs_diff) for k, v in f.items()}
    assert choose_method(unlabeled) == "max"  # agreement: max leads; mse's 4 more departures are not noise

    def of128(same: int, right: int, db: float) -> Fidelity:
        return Fidelity(n=128, top1_agreement=100 * same / 128, sqnr_db=db, max_abs_diff=0.5, top1=100 * right / 128)

    # Seen on 128 held-out images of the bundled ResNet-20: entropy 2 images ahead at 19.8 dB against mse at
    # 34.5 dB, entropy departing from FP32 on 4 images: its lead is noise, the SQNR decides.
    assert choose_method({"entropy": of128(124, 120, 19.8), "mse": of128(127, 118, 34.5)}) == "mse"
    # but a lead beyond the leader's departures counts: 3 images ahead with 1 departure
    assert choose_method({"entropy": of128(127, 121, 19.8), "mse": of128(127, 118, 34.5)}) == "entropy"
    # and a method that departs on 4 images, all wrong, does not tie with a leader that never departs
    assert choose_method({"max": of128(128, 120, 30.0), "mse": of128(124, 116, 34.5)}) == "max"


def test_auto_range_candidates():
    from rescompress.quantization.pipeline import method_label, range_candidates

    auto = range_candidates("auto", 99.99)
    assert auto == {"max": ("max", 99.99), "percentile 99.99": ("percentile", 99.99),
                    "percentile 99.999": ("percentile", 99.999), "entropy": ("entropy", 99.99),
                    "mse": ("mse", 99.99)}
    # a --percentile of the user's is tried beside the two standard levels, in increasing order
    assert [k for k in range_candidates("auto", 99.9) if k.startswith("percentile")] == [
        "percentile 99.9", "percentile 99.99", "percentile 99.999"]
    assert range_candidates("percentile", 99.9) == {"percentile 99.9": ("percentile", 99.9)}
    assert range_candidates("mse", 99.9) == {"mse": ("mse", 99.9)}
    assert method_label("percentile", 99.999) == "percentile 99.999" and method_label("max", 99.99) == "max"
    assert method_label("percentile", 99.99999) == "percentile 99.99999"  # not rounded to 100


# ------------------------------------------------------------------------------------------ fallback search
def _ranking(n: int) -> list[LayerSensitivity]:
    return [LayerSensitivity(f"L{i}", float(i)) for i in range(n)]


def test_fallback_finds_fewest_layers():
    calls = []

    def measure(float_nodes):  # drop shrinks as the most sensitive layers go back to float
        calls.append(len(float_nodes))
        return max(0.0, 1.0 - 0.1 * len(float_nodes))

    res = search_fallback(_ranking(20), measure, max_drop=0.25)
    assert len(res.float_nodes) == 8 and res.float_nodes == tuple(f"L{i}" for i in range(8))
    assert res.achieved == pytest.approx(0.2)
    assert len(set(calls)) <= 8  # doubling then bisection, not a linear scan


def test_fallback_limit_is_inclusive_like_the_gate():
    """A drop equal to --max-drop passes even when float rounding puts it a hair above (92.7 - 92.0)."""
    drop = 92.7 - 92.0
    assert drop > 0.7  # 0.7000000000000028
    res = search_fallback(_ranking(5), lambda f: drop if not f else 0.0, max_drop=0.7)
    assert res.float_nodes == () and res.achieved == drop
    res = search_fallback(_ranking(5), lambda f: 0.71 if len(f) < 2 else 0.0, max_drop=0.7)
    assert len(res.float_nodes) == 2


def test_fallback_impossible_raises_check_failed():
    with pytest.raises(CheckFailed, match="no configuration"):
        search_fallback(_ranking(5), lambda f: 1.0, max_drop=0.5)
    with pytest.raises(CheckFailed):
        search_fallback(_ranking(20), lambda f: max(0.0, 1.0 - 0.1 * len(f)), max_drop=0.25, max_float=3)
    # --max-fallback at or above the layer count still keeps one layer quantized (as the default does).
    with pytest.raises(CheckFailed, match="at most 4 layer"):
        search_fallback(_ranking(5), lambda f: 0.0 if len(f) == 5 else 1.0, max_drop=0.5, max_float=50)


def test_fallback_ranks_layers_only_when_a_fallback_can_help():
    """Ranking costs one run per layer: a model that meets the limit fully quantized, or --max-fallback 0,
    must not pay for it."""
    ranked = []

    def rank():
        ranked.append(1)
        return _ranking(5)

    res = search_fallback(rank, lambda f: 0.1, max_drop=0.5)
    assert res.float_nodes == () and res.tried == ((0, 0.1),) and ranked == []
    with pytest.raises(CheckFailed, match="at most 0 layer"):
        search_fallback(rank, lambda f: 1.0, max_drop=0.5, max_float=0)
    assert ranked == []
    given = search_fallback(_ranking(5), lambda f: 0.1, max_drop=0.5)  # a given list is returned, not dropped
    assert [r.node for r in given.ranking] == [f"L{i}" for i in range(5)]
    res = search_fallback(rank, lambda f: 1.0 - 0.3 * len(f), max_drop=0.5)
    assert res.float_nodes == ("L0", "L1") and ranked == [1]  # ranked once, when needed
    assert [r.node for r in res.ranking] == [f"L{i}" for i in range(5)]


# ------------------------------------------------------------------------------------------ trained model
def test_fidelity_on_trained_reference(reference_checkpoint, calib_npz, eval_npz, tmp_path):
    if not reference_checkpoint.exists():
        pytest.skip("the trained reference model is not bundled yet")
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    # Bounds from measurement (512 images, full slices: ORT 33.7 dB / 99.6%, TRT 28.2 dB / 99.15% with max),
    # less a margin for the smaller sample here.
    cfg = QuantizeConfig(method="max", num_images=256, eval_limit=1000, latency=False)
    r = quantize_model(reference_checkpoint, calib_npz, tmp_path, config=cfg, eval_data=eval_npz)
    ort_f, trt_f = r.fidelity["onnxruntime"], r.fidelity["tensorrt"]
    assert ort_f.n == 1000 and ort_f.fp32_top1 > 85.0
    assert ort_f.sqnr_db >= 31.0 and trt_f.sqnr_db >= 26.0
    assert ort_f.top1_agreement >= 99.0 and trt_f.top1_agreement >= 98.5
    assert abs(ort_f.top1_drop) <= 0.5 and abs(trt_f.top1_drop) <= 0.8
    assert check_trt_qdq(onnx.load(str(r.artifacts["tensorrt"]))) == []


def test_tensors_read_only_by_relu_share_the_relu_range(fp32, calib_npz, tmp_path):
    """They are not observed (that would block Conv+Relu fusion); the plan still covers every tensor."""
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model
    from rescompress.quantization.placement import GraphIndex, prepare_model

    base = prepare_model(fp32)
    index = GraphIndex(base)
    shared = index.relu_only_inputs()
    relus = [n for n in base.graph.node if n.op_type == "Relu"]
    assert shared and len(shared) <= len(relus)
    for t, r in shared.items():
        assert [n.op_type for n, _ in index.consumers[t]] == ["Relu"] and index.producer[r].op_type == "Relu"
    path = tmp_path / "r20.fp32.onnx"
    onnx.save(fp32, str(path))
    cfg = QuantizeConfig(method="max", num_images=64, latency=False)
    r = quantize_model(path, calib_npz, tmp_path / "out", config=cfg)
    plan = r.plan
    assert set(index.float_activations()) <= set(plan.activations)
    placed = set().union(*(p.calib_tensors() for p in r.placements.values()))
    skipped = [t for t in shared if t not in placed]
    assert skipped and r.calibration["tensors_observed"] == r.calibration["tensors"] - len(skipped)
    for t in skipped:
        assert plan.activations[t].to_dict() | {"name": None} == plan.activations[shared[t]].to_dict() | {"name": None}


def test_max_drop_returns_sensitive_layers_to_float(fp32, calib_npz, tmp_path):
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    path = tmp_path / "r20.fp32.onnx"
    onnx.save(fp32, str(path))
    # Clipping at the 30th percentile ruins the model; falling back must bring disagreement under 2%.
    # Each file meets the limit on its own (the TensorRT file was written unchecked when only ORT's was).
    cfg = QuantizeConfig(method="percentile", percentile=30.0, num_images=64, targets=("onnxruntime", "tensorrt"),
                         max_drop=2.0, latency=False, weight_rounding="nearest")
    r = quantize_model(path, calib_npz, tmp_path / "out", config=cfg)
    assert r.fallback is not None and set(r.fallback) == {"onnxruntime", "tensorrt"}
    for target, fb in r.fallback.items():
        assert fb.metric == "disagreement"  # no --eval-data: agreement with FP32 only
        assert 1 <= len(fb.float_nodes) < len(r.placements[target].quantized_nodes) + len(fb.float_nodes)
        assert fb.achieved <= 2.0 and fb.tried[0][0] == 0 and fb.tried[0][1] > 2.0
        assert set(r.placements[target].float_nodes) == set(fb.float_nodes)
        assert 100.0 - r.fidelity[target].top1_agreement <= 2.0 + 1e-9
        q = onnx.load(str(r.artifacts[target]))
        kept_float = {n.name for n in q.graph.node if n.name in fb.float_nodes}
        assert kept_float == set(fb.float_nodes)


def test_unknown_ops_stay_float_and_are_reported(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.sigmoid(self.conv1(x))  # an op the placement rules do not know
            return self.fc(self.conv2(y).mean(dim=(2, 3)))

    path = tmp_path / "odd.onnx"
    torch.onnx.export(Odd().eval(), torch.randn(2, 3, 16, 16), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}}, opset_version=17)
    m = prepare_model(onnx.load(str(path)))
    for target in ("onnxruntime", "tensorrt"):
        p = place(m, target)
        assert any("Sigmoid" in u for u in p.unsupported)
        assert sum(1 for n in p.quantized_nodes if "conv" in n) == 2
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    names = GraphIndex(m).float_activations()
    hists, _ = collect_histograms(m, names, [x])
    pls = [place(m, "onnxruntime"), place(m, "tensorrt")]
    plan = QuantPlan(activation_entries(hists, "max", 99.99), weight_entries(m, [w for p in pls for w in p.weights]),
                     Provenance(model_fingerprint(m), None, 4, "max", None, {}))
    for p in pls:
        q = emit_qdq(m, plan, p)
        onnx.checker.check_model(q)
        assert sqnr_db(_run(m, x), _run(q, x)) > 25.0


@pytest.mark.parametrize("dynamo,keepdim", [(True, True), (False, False)])
def test_spatial_mean_becomes_global_average_pool(tmp_path, dynamo, keepdim):
    """``x.mean((2, 3))`` (ReduceMean; axes as an input from opset 18) is rewritten to GlobalAveragePool,
    so ORT runs it as QLinearGlobalAveragePool; a mean over channels is left alone."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = y + y.mean(dim=1, keepdim=True)  # channel mean: not a pooling
            return self.fc(y.mean(dim=(-1, -2), keepdim=keepdim).flatten(1))

    torch.manual_seed(0)
    path = tmp_path / "head.onnx"
    torch.onnx.export(Head().eval(), (torch.randn(2, 3, 12, 12),), str(path), dynamo=dynamo, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}},
                      **({} if dynamo else {"opset_version": 17}))
    original = onnx.load(str(path))
    m = prepare_model(original)
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["GlobalAveragePool"] == 1 and ops["ReduceMean"] == 1  # the channel mean stays
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(m, x), _run(original, x), rtol=1e-5, atol=1e-6)
    pl = place(m, "onnxruntime")
    gap = next(n for n in m.graph.node if n.op_type == "GlobalAveragePool")
    assert gap.name in pl.quantized_nodes and not any("GlobalAveragePool" in u for u in pl.unsupported)


def test_weights_written_as_identity_or_constant_are_quantized(tmp_path):
    """PyTorch's TorchScript exporter writes a weight equal to an earlier one as an Identity of it, and other
    exporters write weights as Constant nodes: every conv must still get its own quantized weight."""
    torch.manual_seed(0)
    path = tmp_path / "r20.onnx"
    torch.onnx.export(build_model("resnet20", 10, 1).eval(), (torch.randn(2, 1, 28, 28),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "b"}},
                      opset_version=17)
    original = onnx.load(str(path))
    assert any(n.op_type == "Identity" for n in original.graph.node)  # default BatchNorms: equal zero biases
    # Move one conv weight into a Constant node as well.
    conv = next(n for n in original.graph.node if n.op_type == "Conv" and n.input[1] in
                {i.name for i in original.graph.initializer})
    weight = next(i for i in original.graph.initializer if i.name == conv.input[1])
    original.graph.initializer.remove(weight)
    original.graph.node.insert(0, helper.make_node("Constant", [], [conv.input[1]], value=weight))
    m = prepare_model(original)
    assert not any(n.op_type in ("Identity", "Constant") for n in m.graph.node)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(_run(m, x), _run(original, x), rtol=1e-6, atol=1e-6)
    for target in ("onnxruntime", "tensorrt"):
        p = place(m, target)
        assert len(p.weights) == 22 and len({w.initializer for w in p.weights}) == 22  # 21 convs + fc


def test_refine_raises_trt_sqnr_on_trained_reference(reference_checkpoint, calib_npz, eval_npz, tmp_path):
    """Scale refinement on held-out calibration images must raise the TensorRT file's logit SQNR on
    *other* images (the eval slice), stay within its evaluation budget, and keep the file TensorRT-legal."""
    if not reference_checkpoint.exists():
        pytest.skip("the trained reference model is not bundled yet")
    from rescompress.data import open_dataset
    from rescompress.quantization.pipeline import _emit_checked, load_fp32
    from rescompress.quantization.refine import DEFAULT_FACTORS, refine_plan

    src = load_fp32(reference_checkpoint, tmp_path)
    base = prepare_model(src.proto)
    cal = open_dataset(calib_npz, src.preprocess)
    xc = np.stack([cal[i][0].numpy() for i in range(384)])
    held = np.stack([cal[i][0].numpy() for i in range(384, 512)])
    ev = open_dataset(eval_npz, src.preprocess)
    xe = np.stack([ev[i][0].numpy() for i in range(1000)])
    placements = {t: place(base, t) for t in ("onnxruntime", "tensorrt")}
    names = sorted(set().union(*(p.calib_tensors() for p in placements.values())))
    hists, stats = collect_histograms(base, names, [xc[i : i + 64] for i in range(0, len(xc), 64)])
    prov = Provenance(model_fingerprint(base), "test", stats.num_images, "mse", None, {})
    weights = weight_entries(base, [w for p in placements.values() for w in p.weights])
    plan = QuantPlan(activation_entries(hists, "mse", 99.99), weights, prov)
    ref = _run(base, xe)

    trt = placements["tensorrt"]
    r = refine_plan(base, plan, trt, held, _emit_checked, max_tensors=6)
    assert r.evaluations == 1 + 6 * len(DEFAULT_FACTORS)
    assert r.changed and r.after_db > r.before_db
    before = sqnr_db(ref, _run(emit_qdq(base, plan, trt), xe))
    refined = emit_qdq(base, r.plan, trt)
    after = sqnr_db(ref, _run(refined, xe))
    assert after >= before + 0.5, (before, after)
    assert check_trt_qdq(refined) == []
    # Only the TensorRT parameters moved; the plan still round-trips through JSON.
    assert all(r.plan.activations[n].params["onnxruntime"] == plan.activations[n].params["onnxruntime"]
               for n in plan.activations)
    assert QuantPlan.load(r.plan.save(tmp_path / "p.json")).to_dict() == r.plan.to_dict()


def test_refine_budget_scales_images_then_tensors():
    from rescompress.quantization.refine import MIN_REFINE_IMAGES, REFINE_MAC_BUDGET, refine_budget

    small = refine_budget(31_000_000, held_out=128, tensors=12, targets=2)
    assert (small.images, small.tensors, small.note) == (128, 12, "")
    # runs = 2 * (12 * 5 + 2) = 124: a model where 64 images fit exactly
    mid = refine_budget(int(REFINE_MAC_BUDGET // (124 * 64)), held_out=128, tensors=12, targets=2)
    assert (mid.images, mid.tensors) == (64, 12) and "compute budget" in mid.note
    big = refine_budget(4_087_000_000, held_out=128, tensors=12, targets=2)  # resnet50 at 224x224
    assert big.images == MIN_REFINE_IMAGES and big.tensors == 1
    assert big.images * 4_087_000_000 * 2 * (big.tensors * 5 + 2) <= REFINE_MAC_BUDGET
    huge = refine_budget(40_000_000_000, held_out=128, tensors=12, targets=2)
    assert huge.tensors == 0 and huge.note.startswith("skipped")
    assert refine_budget(31_000_000, held_out=128, tensors=0, targets=2).tensors == 0


def test_onnx_macs_match_the_torch_count(fp32):
    from rescompress.calibration.collect import tensor_shapes
    from rescompress.models import build_model
    from rescompress.profile import count_macs
    from rescompress.quantization.refine import onnx_macs

    torch_macs = count_macs(build_model("resnet20", 10, 1), (1, 1, 28, 28))
    got = onnx_macs(fp32, tensor_shapes(fp32))
    assert got == pytest.approx(torch_macs, rel=0.02)


def test_hessian_rounding_beats_nearest_on_layer_output_error():
    """Error feedback lowers the output error (w - q)^T H (w - q) that nearest rounding leaves."""
    from rescompress.quantization.rounding import hessian_round

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g, dtype=torch.float64)
    h = x.T @ x  # correlated inputs, as in a real layer
    w = torch.randn(16, 48, generator=g, dtype=torch.float64)
    s = w.abs().amax(1) / 127
    nearest = torch.clamp(torch.round(w / s[:, None]), -127, 127)
    fed = hessian_round(w, s, h)
    assert fed.dtype == torch.float64 and fed.shape == w.shape
    assert torch.all(fed == fed.round()) and fed.abs().max() <= 127
    assert (fed - nearest).abs().max() <= 3  # a few levels at most: same grid, other choices

    def out_err(q: torch.Tensor) -> float:
        return float(((x @ (w - q * s[:, None]).T) ** 2).sum())

    assert out_err(fed) < 0.6 * out_err(nearest)


def test_hessian_rounding_in_the_pipeline(fp32, calib_npz, tmp_path):
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model
    from rescompress.quantization.rounding import with_rounded_weights

    path = tmp_path / "r20.fp32.onnx"
    onnx.save(fp32, str(path))
    cfg = QuantizeConfig(method="max", num_images=128, latency=False, weight_rounding="hessian",
                         rounding_images=64, refine_tensors=0)
    r = quantize_model(path, calib_npz, tmp_path / "out", config=cfg)
    rep = r.calibration["weight_rounding"]
    convs = [n for n in fp32.graph.node if n.op_type in ("Conv", "Gemm")]
    assert rep["layers"] == len(convs) and rep["images"] == 64 and rep["skipped"] == []
    # The emitted int8 weights differ from nearest rounding somewhere, by at most a few levels.
    near = quantize_model(path, calib_npz, tmp_path / "near", config=QuantizeConfig(
        method="max", num_images=128, latency=False, refine_tensors=0, weight_rounding="nearest"))
    assert "weight_rounding" not in near.calibration
    qa, qb = (onnx.load(str(x.artifacts["tensorrt"])) for x in (r, near))
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in qa.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    wb = {i.name: onnx.numpy_helper.to_array(i) for i in qb.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weights = [k for k in wa if k.endswith("_quantized") and wa[k].ndim >= 2]
    assert weights and set(weights) <= set(wb)
    diffs = [np.abs(wa[k].astype(int) - wb[k].astype(int)) for k in weights]
    assert sum(int((d > 0).sum()) for d in diffs) > 0 and max(int(d.max()) for d in diffs) <= 8
    # A layer the placement keeps in float keeps its FP32 weights.
    p = r.placements["onnxruntime"]
    fake = {p.weights[0].initializer: onnx.numpy_helper.from_array(np.zeros(1, np.float32), p.weights[0].initializer)}
    from dataclasses import replace as dc_replace

    untouched = with_rounded_weights(fp32, fake, dc_replace(p, weights=()))
    assert untouched is fp32


def test_hessian_rounding_needs_calibration_data(fp32, calib_npz, tmp_path):
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    path = tmp_path / "r20.fp32.onnx"
    onnx.save(fp32, str(path))
    fast = {"method": "max", "num_images": 32, "latency": False, "refine_tensors": 0}
    first = quantize_model(path, calib_npz, tmp_path / "a", config=QuantizeConfig(weight_rounding="nearest", **fast))
    assert first.plan.rounding is None and "weights" not in first.artifacts
    with pytest.raises(RescompressError, match="needs --calib-data"):
        quantize_model(path, None, tmp_path / "b", plan=first.artifacts["plan"],
                       config=QuantizeConfig(weight_rounding="hessian", latency=False))
    # The default (auto) says so when there are no images to round from.
    again = quantize_model(path, None, tmp_path / "c", plan=first.artifacts["plan"],
                           config=QuantizeConfig(latency=False))
    assert again.calibration["weight_rounding"].startswith("nearest (no --calib-data")
    with pytest.raises(RescompressError, match="--weight-rounding"):
        QuantizeConfig(weight_rounding="adaround")


def test_sqnr_of_identical_or_silent_logits_is_capped_so_reports_are_strict_json():
    """A layer whose quantization changes nothing (e.g. Flatten) gave SQNR inf, and the quantize JSON held
    'Infinity', which strict JSON parsers refuse."""
    import json

    from rescompress.measure.agreement import SQNR_CAP_DB
    from rescompress.quantization.fidelity import compare

    x = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    assert sqnr_db(x, x) == SQNR_CAP_DB
    assert sqnr_db(np.zeros_like(x), x) == -SQNR_CAP_DB
    assert sqnr_db(x, x + 1e-3) == pytest.approx(10 * np.log10((x.astype(np.float64) ** 2).sum() / (80 * 1e-6)),
                                                  rel=1e-4)
    json.dumps(compare(x, x).to_dict(), allow_nan=False)


def test_bias_add_after_matmul_is_not_a_residual(fp32, plan):
    """A classifier written as MatMul + Add (tf2onnx, Keras) or a Conv with its bias split into an Add: the
    Add's constant input is a bias, so the TensorRT file passes the checker (it failed the whole run)."""
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    w = numpy_helper.to_array(inits[gemm.input[1]])
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc_wt"))
    at = list(g.node).index(gemm)
    g.node.remove(gemm)
    g.node.insert(at, helper.make_node("Add", ["fc_mm", gemm.input[2]], [gemm.output[0]], name="/fc/Add"))
    g.node.insert(at, helper.make_node("MatMul", [gemm.input[0], "fc_wt"], ["fc_mm"], name="/fc/MatMul"))
    placement = place(m, "tensorrt")
    assert "/fc/MatMul" in placement.quantized_nodes
    weights = weight_entries(m, placement.weights)
    q = emit_qdq(m, QuantPlan(plan.activations, {**plan.weights, **weights}, plan.provenance), placement)
    assert check_trt_qdq(q) == []
    np.testing.assert_allclose(_run(m, np.zeros((2, 1, 28, 28), np.float32)),
                               _run(fp32, np.zeros((2, 1, 28, 28), np.float32)), rtol=1e-5, atol=1e-5)


def test_plan_preprocessing_compares_pixels_not_spelling(plan):
    """A mean given once equals the same mean per channel; a different std is refused."""
    from dataclasses import replace as dc_replace

    from rescompress.errors import RescompressError

    pre = get_preset("imagenet").with_overrides(mean=(0.5,), std=(0.25,))
    p = QuantPlan(plan.activations, plan.weights, dc_replace(plan.provenance, preprocess=pre.to_dict()))
    fp = plan.provenance.model_fingerprint
    p.check_model(fp, pre.with_overrides(mean=(0.5, 0.5, 0.5)).to_dict())
    with pytest.raises(RescompressError, match="other preprocessing"):
        p.check_model(fp, pre.with_overrides(std=(0.5,)).to_dict())


def test_first_images_spans_batches():
    """The per-layer SQNR table took only the first batch (32 images, or 7 with --batch-size 7), not 64."""
    from rescompress.quantization.pipeline import LAYER_SQNR_IMAGES, _first_images

    loader = [(torch.full((7, 1, 2, 2), float(i)), torch.zeros(7)) for i in range(12)]
    got = np.concatenate(_first_images(loader, LAYER_SQNR_IMAGES))
    assert got.shape == (LAYER_SQNR_IMAGES, 1, 2, 2) and got[-1, 0, 0, 0] == (LAYER_SQNR_IMAGES - 1) // 7
    assert np.concatenate(_first_images(loader[:2], LAYER_SQNR_IMAGES)).shape[0] == 14  # fewer when fewer


def test_rounding_statistics_come_from_the_quantized_model(fp32, plan, images):
    """The layer statistics H = sum x x^T use what the quantized layer reads (its dequantized input), not the
    FP32 input: for the first convolution, the image on the uint8 grid of the ONNX Runtime file."""
    from rescompress.quantization.rounding import _columns, _layers, collect_hessians, round_weights

    placements = [place(fp32, "tensorrt"), place(fp32, "onnxruntime")]
    rounded, report = round_weights(fp32, plan, placements, [images[:16]])
    assert report.observed == "onnxruntime Q/DQ model" and report.layers == 22 and len(rounded) == 22
    assert round_weights(fp32, plan, [], [images[:16]])[1].layers == 0  # nothing to round: no session run
    x_name = fp32.graph.input[0].name
    first = next(layer for layer in _layers(fp32, placements[1].weights)[0] if layer.input == x_name)
    observed = emit_qdq(fp32, plan, placements[1])
    h_q = collect_hessians(fp32, [first], [images[:16]], observed=observed)[0][first.key]
    h_f = collect_hessians(fp32, [first], [images[:16]])[0][first.key]
    p = plan.activation(x_name).params["onnxruntime"]
    x_q = (np.clip(np.rint(images[:16] / p.scale) + p.zero_point, 0, 255) - p.zero_point) * p.scale
    cols = _columns(first, x_q.astype(np.float32))
    torch.testing.assert_close(h_q, (cols @ cols.T).double(), rtol=1e-4, atol=1e-3)
    cols_f = _columns(first, images[:16])
    torch.testing.assert_close(h_f, (cols_f @ cols_f.T).double(), rtol=1e-4, atol=1e-3)
    assert not torch.allclose(h_q, h_f, rtol=1e-4, atol=1e-3)


def test_layer_sqnr_pools_batches_like_one_pass(fp32, plan, images):
    """The per-layer table runs batch by batch (memory of one batch) and gives the pooled SQNR of all images."""
    from rescompress.calibration.collect import make_session, with_extra_outputs
    from rescompress.quantization.pipeline import _layer_sqnr

    placement = place(fp32, "onnxruntime")
    qmodel = emit_qdq(fp32, plan, placement)
    x = images[:40]
    split = {s.tensor: s.sqnr_db for s in _layer_sqnr(fp32, qmodel, placement, [x[:16], x[16:32], x[32:]], None)}
    names = [a.name for a in placement.activations]
    ref = make_session(with_extra_outputs(fp32, names)).run(names, {fp32.graph.input[0].name: x})
    deq = [f"{n}_dequantized" for n in names]
    got = make_session(with_extra_outputs(qmodel, deq)).run(deq, {qmodel.graph.input[0].name: x})
    assert len(split) == len(names) > 10
    for n, r, g in zip(names, ref, got, strict=True):
        assert split[n] == pytest.approx(sqnr_db(r, g), abs=1e-6)
