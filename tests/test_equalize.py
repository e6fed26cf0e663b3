"""Activation range equalization: which channels are coupled, that rescaling keeps the FP32 function, that no
activation's range grows, and what the quantize pipeline does with it (plan, TensorRT cache)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from rescompress.calibration.collect import make_session, tensor_shapes
from rescompress.cli.app import app
from rescompress.errors import RescompressError
from rescompress.export import export_onnx
from rescompress.folding import fold_batchnorm
from rescompress.quantization.equalize import (
    apply_scales,
    channel_extremes,
    channel_groups,
    from_plan,
    group_scales,
    measure,
)
from rescompress.quantization.placement import prepare_model
from rescompress.quantization.trt_cache import parse_cache
from rescompress.spec import Preprocess

runner = CliRunner()


def _randomize_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Uneven BN scales, so channel ranges differ as in a trained network."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) ** 3 * 2 + 0.05)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _exported(ctor, tmp_path, size=64, **kw) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = ctor(num_classes=10, **kw).eval()
    _randomize_bn(model)
    pre = Preprocess(preset="custom", size=(size, size), channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    folded = fold_batchnorm(model, input_shape=pre.input_shape(2)).model
    path = tmp_path / "m.onnx"
    export_onnx(folded, pre, path, arch="resnet", num_classes=10)
    return prepare_model(onnx.load(str(path)))


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = make_session(model, 1)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    return _exported(torchvision.models.resnet18, tmp_path_factory.mktemp("r18"))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32)


def test_resnet18_groups_are_the_residual_streams_and_block_insides(r18):
    groups = channel_groups(r18, tensor_shapes(r18))
    # 4 residual streams (one per stage) + one inside each of the 8 BasicBlocks
    assert len(groups) == 12
    by_first = {g.tensors[0]: g for g in groups}
    stream1 = by_first["/conv1/Conv_output_0"]
    assert stream1.channels == 64
    assert {"/relu/Relu_output_0", "/maxpool/MaxPool_output_0", "/layer1/layer1.1/Add_output_0"} <= set(stream1.tensors)
    # the stem conv's output is read only by a Relu: its negative part is never quantized, so it sets no factor;
    # the adds' outputs, also read only by a Relu, likewise
    assert "/conv1/Conv_output_0" in stream1.tensors and "/conv1/Conv_output_0" not in stream1.observed
    assert "/layer1/layer1.0/conv2/Conv_output_0" in stream1.observed  # read by the Add
    # written by the stem and both blocks' conv2, read by both blocks' conv1 and by layer2's conv1 and downsample
    assert sorted(stream1.producers) == ["/conv1/Conv", "/layer1/layer1.0/conv2/Conv", "/layer1/layer1.1/conv2/Conv"]
    assert sorted(c for c, _, _ in stream1.consumers) == [
        "/layer1/layer1.0/conv1/Conv", "/layer1/layer1.1/conv1/Conv", "/layer2/layer2.0/conv1/Conv",
        "/layer2/layer2.0/downsample/downsample.0/Conv"]
    stream4 = next(g for g in groups if "/avgpool/GlobalAveragePool_output_0" in g.tensors)
    assert stream4.channels == 512 and ("/fc/Gemm", 1, 1) in stream4.consumers  # the classifier reads the pooled stream
    assert "/layer4/layer4.0/downsample/downsample.0/Conv" in stream4.producers
    inner = by_first["/layer2/layer2.1/conv1/Conv_output_0"]
    assert inner.producers == ("/layer2/layer2.1/conv1/Conv",)
    assert inner.consumers == (("/layer2/layer2.1/conv2/Conv", 1, 1),)


@pytest.mark.parametrize("ctor,kw,n_groups", [
    (torchvision.models.resnet18, {}, 12),
    # the stem's output + 4 streams (layer1.0 has a downsample) + 2 inside each of 16 Bottlenecks
    (torchvision.models.resnet50, {}, 37),
    (torchvision.models.resnext50_32x4d, {}, 37),  # grouped conv2 reads conv1's output
])
def test_rescaling_keeps_the_fp32_function(ctor, kw, n_groups, tmp_path, images):
    model = _exported(ctor, tmp_path, **kw)
    groups = channel_groups(model, tensor_shapes(model))
    assert len(groups) == n_groups
    rng = np.random.default_rng(1)
    scales = [rng.uniform(0.1, 10.0, g.channels) for g in groups]
    scaled = apply_scales(model, groups, scales)
    a, b = _logits(model, images), _logits(scaled, images)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    # and the weights did change
    wa = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    wb = {i.name: numpy_helper.to_array(i) for i in scaled.graph.initializer}
    changed = [k for k in wa if wa[k].shape == wb[k].shape and not np.allclose(wa[k], wb[k])]
    assert len(changed) > 2 * n_groups


def test_no_tensor_range_grows_and_small_channels_reach_the_grid(r18, images):
    shapes = tensor_shapes(r18)
    eq = measure(r18, shapes, [images[:8], images[8:]], threads=1)
    assert eq.images == 16 and len(eq.groups) == 12
    before, _ = channel_extremes(r18, eq.groups, [images], shapes, threads=1)
    after, _ = channel_extremes(eq.apply(r18), eq.groups, [images], shapes, threads=1)
    for g, s in zip(eq.groups, eq.scales, strict=True):
        assert np.all(s >= 1.0) and np.all(s <= 16.0)
        for t in g.observed:
            (lo0, hi0), (lo1, hi1) = before[t], after[t]
            assert hi1.max() <= hi0.max() * (1 + 1e-5) + 1e-6
            assert lo1.min() >= lo0.min() * (1 + 1e-5) - 1e-6
            np.testing.assert_allclose(hi1, hi0 * s, rtol=1e-4, atol=1e-5)  # channel c scaled by s_c
        # every channel not capped now reaches its tensor's extreme in some tensor of the group
        share = np.max([np.maximum(after[t][1] / after[t][1].max(),
                                   after[t][0] / min(after[t][0].min(), -1e-30)) for t in g.observed], axis=0)
        uncapped = (s < 16.0) & (share > 0)  # (a channel never away from zero keeps 1)
        assert uncapped.any()
        np.testing.assert_allclose(share[uncapped], 1.0, rtol=1e-4)
    summary = eq.to_dict()
    assert summary["groups"] == 12 and summary["groups_scaled"] >= 1 and summary["median_scale"] > 1.0


def test_scales_dead_channels_alpha_and_cap():
    from rescompress.quantization.equalize import ChannelGroup

    g = ChannelGroup(("a", "b", "x"), ("p",), (("c", 1, 1),), 4, ("a", "b"))  # x: read only by a Relu
    ext = {"a": (np.array([0.0, 0.0, 0.0, 0.0]), np.array([8.0, 2.0, 0.0, 0.001])),
           "b": (np.array([-1.0, -4.0, 0.0, 0.0]), np.array([1.0, 0.25, 0.0, 0.0]))}
    s = group_scales(g, ext, alpha=1.0, max_scale=16.0)
    # channel 0 reaches a's max; channel 1 reaches b's min; channel 2 never moves (kept); channel 3 capped
    np.testing.assert_allclose(s, [1.0, 1.0, 1.0, 16.0])
    ext["b"] = (np.array([-4.0, -1.0, 0.0, 0.0]), np.array([1.0, 0.25, 0.0, 0.0]))
    # channel 1 now reaches a quarter of every extreme
    np.testing.assert_allclose(group_scales(g, ext, alpha=1.0), [1.0, 4.0, 1.0, 16.0])
    np.testing.assert_allclose(group_scales(g, ext, alpha=0.5), [1.0, 2.0, 1.0, 16.0])  # (8 / 0.001) ** 0.5 > 16


def _chain(second_op: str = "Relu", graph_output: bool = False, shared_weight: bool = False) -> onnx.ModelProto:
    """input -> Conv A -> second_op -> Conv B -> logits."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "ba")]
    nodes = [helper.make_node("Conv", ["input", "wa", "ba"], ["a"], name="A")]
    if second_op == "Clip":
        inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["r"], name="act"))
    else:
        nodes.append(helper.make_node(second_op, ["a"], ["r"], name="act"))
    wb = "wa" if shared_weight else "wb"
    if not shared_weight:
        inits.append(numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32), "wb"))
    nodes.append(helper.make_node("Conv", ["r", wb], ["logits"], name="B"))
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if graph_output:
        outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 3, 3])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_only_safe_groups_are_rescaled():
    ok = _chain("Relu")
    assert [g.tensors for g in channel_groups(ok, tensor_shapes(ok))] == [("a", "r")]
    for bad in (_chain("Clip"), _chain("Sigmoid"), _chain("Relu", graph_output=True)):
        # Clip(0, 6) and Sigmoid do not commute with a positive factor; a graph output must keep its values
        assert all("r" not in g.tensors for g in channel_groups(bad, tensor_shapes(bad)))
    # MatMul contracts the last axis, not the channels of a 4-D tensor
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "wa"], ["a"], name="A"),
         helper.make_node("MatMul", ["a", "m"], ["logits"], name="mm")], "mm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "wa"),
         numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "m")])
    mm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert channel_groups(mm, tensor_shapes(mm)) == []
    # a weight read by two nodes cannot take two sets of factors (B reads A's weight here: shapes do not even
    # fit, so only the grouping is checked)
    shared = _chain("Relu", shared_weight=True)
    assert channel_groups(shared, tensor_shapes(shared)) == []


def test_plan_factors_are_matched_and_checked(r18):
    shapes = tensor_shapes(r18)
    groups = channel_groups(r18, shapes)
    rng = np.random.default_rng(2)
    factors = {g.tensors[0]: rng.uniform(1, 2, g.channels).tolist() for g in groups}
    entry = {"alpha": 1.0, "images": 3, "scales": factors}
    eq = from_plan(r18, shapes, entry)
    assert [g.tensors[0] for g in eq.groups] == [g.tensors[0] for g in groups]
    from rescompress.errors import RescompressError

    first = groups[0].tensors[0]
    for bad in ({**entry["scales"], first: [1.0] * 3}, {**entry["scales"], "/nowhere": [1.0]},
                {**entry["scales"], first: [-1.0] * groups[0].channels}):
        with pytest.raises(RescompressError, match="equalization"):
            from_plan(r18, shapes, {**entry, "scales": bad})


def test_cli_equalization_keeps_the_tensorrt_cache_of_the_fp32_file(reference_checkpoint, calib_npz, eval_npz,
                                                                     tmp_path):
    """With --method max the cache's scales are the FP32 tensors' maxima either way: equalization must leave the
    cache as it is, change the INT8 weights, and be recorded in the plan, the report and the summary."""
    outs = {}
    for flag in ("--equalize", "--no-equalize"):
        out = tmp_path / flag.strip("-")
        res = runner.invoke(app, ["quantize", str(reference_checkpoint), "--calib-data", str(calib_npz),
                                  "--eval-data", str(eval_npz), "--eval-limit", "256", "--num-images", "64",
                                  "--method", "max", "--weight-rounding", "nearest", "--no-latency", flag,
                                  "-o", str(out), "--json"])
        assert res.exit_code == 0, res.output
        outs[flag] = (out, json.loads(res.stdout))
    (on, d_on), (off, d_off) = outs["--equalize"], outs["--no-equalize"]
    head_on, cache_on = parse_cache((on / "resnet20_fashion_mnist.int8.trt.cache").read_text())
    head_off, cache_off = parse_cache((off / "resnet20_fashion_mnist.int8.trt.cache").read_text())
    assert head_on == head_off and cache_on.keys() == cache_off.keys() and len(cache_on) > 40
    # the same scales (tensors outside the rescaled groups, e.g. the logits, to float32 rounding)
    assert all(abs(cache_on[k] - cache_off[k]) <= 1e-6 * cache_off[k] for k in cache_on)
    assert d_off["equalization"] is None and "equalization" not in json.loads(
        (off / "resnet20_fashion_mnist.plan.json").read_text())
    e = d_on["equalization"]
    assert e["groups"] == 12 and e["groups_scaled"] >= 1 and e["images"] == 64
    plan = json.loads((on / "resnet20_fashion_mnist.plan.json").read_text())
    assert len(plan["equalization"]["scales"]) == 12 and plan["equalization"]["fp32_cache_scales"]
    w, ops = {}, {}
    for key, out in (("on", on), ("off", off)):
        m = onnx.load(str(out / "resnet20_fashion_mnist.int8.ort.onnx"))
        w[key] = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        ops[key] = [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]
    assert sum(not np.array_equal(w["on"][k], w["off"][k]) for k in w["on"] if k in w["off"]) > 10
    assert ops["on"] == ops["off"]  # the same graph, so the same speed: only weights and scales differ
    assert "Channel equalization" in (on / "resnet20_fashion_mnist.quantize.md").read_text()
    for d in (d_on, d_off):  # both files stay close to FP32
        assert d["fidelity"]["onnxruntime"]["sqnr_db"] > 25
    res = runner.invoke(app, ["quantize", str(reference_checkpoint), "--plan",
                              str(on / "resnet20_fashion_mnist.plan.json"), "--no-equalize", "-o",
                              str(tmp_path / "x")])
    assert res.exit_code == 2 and "--equalize only apply to calibration" in res.stderr
    # A plan made for ONNX Runtime alone still carries the FP32 file's ranges: reused for TensorRT, its cache
    # is the FP32 file's, not the rescaled tensors'.
    ort_only = tmp_path / "ort"
    res = runner.invoke(app, ["quantize", str(reference_checkpoint), "--calib-data", str(calib_npz), "--num-images",
                              "64", "--method", "max", "--weight-rounding", "nearest", "--no-latency", "--target",
                              "onnxruntime", "-o", str(ort_only)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", str(reference_checkpoint), "--plan",
                              str(ort_only / "resnet20_fashion_mnist.plan.json"), "--target", "tensorrt",
                              "--no-latency", "-o", str(tmp_path / "trt")])
    assert res.exit_code == 0, res.output
    _, cache_later = parse_cache((tmp_path / "trt" / "resnet20_fashion_mnist.int8.trt.cache").read_text())
    assert cache_later.keys() == cache_off.keys()
    assert all(abs(cache_later[k] - cache_off[k]) <= 1e-6 * cache_off[k] for k in cache_later)
    # a plan whose factors are not a mapping is refused in one line
    bad = json.loads((ort_only / "resnet20_fashion_mnist.plan.json").read_text())
    bad["equalization"]["scales"] = [1.0, 2.0]
    (tmp_path / "bad.plan.json").write_text(json.dumps(bad))
    res = runner.invoke(app, ["quantize", str(reference_checkpoint), "--plan", str(tmp_path / "bad.plan.json"),
                              "--no-latency", "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "channel equalization is malformed" in res.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("max_samples", [None, 997])
def test_divided_histograms_are_the_unscaled_models(r18, images, max_samples):
    """Histograms of the rescaled model's tensors divided back by channel equal the original model's: same
    extremes, and (strided samples mapped to their channels) the same amax for every method."""
    from rescompress.calibration.collect import collect_histograms, divided_name
    from rescompress.quantization.calibrate import activation_amax

    shapes = tensor_shapes(r18)
    eq = measure(r18, shapes, [images], threads=1)
    factors = eq.factors()
    names = [t for t in factors if t.endswith(("Relu_output_0", "Add_output_0", "Conv_output_0"))][:12]
    assert len(names) == 12
    batches = [images[:6], images[6:12], images[12:]]  # a short last batch too
    scaled, _ = collect_histograms(eq.apply(r18), names, batches, shapes=shapes, max_samples=max_samples,
                                   divided={n: factors[n] for n in names}, threads=1)
    plain, _ = collect_histograms(r18, names, batches, shapes=shapes, max_samples=max_samples, threads=1)
    for n in names:
        a, b = scaled[divided_name(n)], plain[n]
        assert a.min == pytest.approx(b.min, rel=1e-5, abs=1e-6) and a.max == pytest.approx(b.max, rel=1e-5, abs=1e-6)
        assert a.count == b.count and a.zeros == b.zeros
        # the same values to float32 rounding (of the division, and of the rescaled convolutions), which can move a
        # value on a bin edge to its neighbour
        assert np.abs(a.counts - b.counts).sum() <= 1e-3 * a.count
        # (entropy's KL minimum is too flat for that: moving 2 values of 262144 shifted it by 5%)
        for method in ("max", "percentile", "mse"):
            assert activation_amax(a, method, 128, 99.9) == pytest.approx(activation_amax(b, method, 128, 99.9),
                                                                         rel=2e-3), (n, method)
        assert scaled[n].max >= b.max * 0.999  # the rescaled tensor itself differs (its channels grew)


def _one_pass(r18, images, batches, window, **kw):
    """collect_histograms with the factors decided on its first ``window`` images, as quantize does."""
    from rescompress.calibration.collect import Rescale, collect_histograms
    from rescompress.quantization.equalize import from_extremes

    shapes = tensor_shapes(r18)
    groups = channel_groups(r18, shapes)
    names = sorted({t for g in groups for t in g.observed})
    seen = {}

    def decide(extremes, n):
        eq = from_extremes(groups, extremes, n)
        seen.update(eq=eq, images=n)
        return {t: f for t, f in eq.factors().items() if t in names}

    hists, stats = collect_histograms(r18, names, batches, shapes=shapes, threads=1,
                                      rescale=Rescale(tuple(t for g in groups for t in g.observed), window, decide),
                                      **kw)
    return hists, seen, names, shapes


@pytest.mark.parametrize("max_samples", [None, 997])
def test_one_pass_equals_measuring_then_calibrating(r18, images, max_samples):
    """Factors decided inside the calibration pass, on its first images, give the histograms that a separate
    measuring pass on those images followed by calibrating the rescaled model gives: the rescaled tensors' and,
    divided back, the original ones'."""
    from rescompress.calibration.collect import collect_histograms, divided_name
    from rescompress.quantization.calibrate import activation_amax

    batches = [images[:4], images[4:8], images[8:12], images[12:]]
    hists, seen, names, shapes = _one_pass(r18, images, batches, 8, max_samples=max_samples)
    assert seen["images"] == 8  # decided after the first two batches
    eq = measure(r18, shapes, batches[:2], threads=1)
    np.testing.assert_allclose(np.concatenate(seen["eq"].scales), np.concatenate(eq.scales), rtol=1e-5)
    factors = {t: f for t, f in eq.factors().items() if t in names}
    assert len(factors) > 20
    two, _ = collect_histograms(eq.apply(r18), names, batches, shapes=shapes, max_samples=max_samples,
                                divided=factors, threads=1)
    plain, _ = collect_histograms(r18, names, batches, shapes=shapes, max_samples=max_samples, threads=1)
    assert set(hists) == set(two)
    pairs = [(hists[n], two[n]) for n in names] + [(hists[divided_name(n)], plain[n]) for n in factors]
    same_bins = 0
    for a, b in pairs:
        assert a.min == pytest.approx(b.min, rel=1e-5, abs=1e-6)
        assert a.max == pytest.approx(b.max, rel=1e-5, abs=1e-6)
        assert a.count == b.count and a.zeros == b.zeros and a.counts.dtype == np.int64
        assert activation_amax(a, "max", 128, 99.9) == pytest.approx(activation_amax(b, "max", 128, 99.9), rel=1e-5)
        if a.range != pytest.approx(b.range, rel=1e-5):
            # a histogram's range starts at its first batch's largest value and doubles to hold a later one: a
            # later value within float32 rounding of a power of two times the first one can double it or not
            assert max(a.range, b.range) == pytest.approx(2 * min(a.range, b.range), rel=1e-5)
            continue
        same_bins += 1
        assert np.abs(a.counts - b.counts).sum() <= 5e-3 * a.count  # (float32 rounding near bin edges)
        # (the MSE minimum is flat: those few values moved it by up to 3 bins, 0.2%)
        for method, rel in (("percentile", 2e-3), ("mse", 5e-3)):
            assert activation_amax(a, method, 128, 99.9) == pytest.approx(activation_amax(b, method, 128, 99.9),
                                                                         rel=rel), method
    assert same_bins >= 0.9 * len(pairs)


def test_one_pass_thins_the_kept_samples_to_its_budget_and_weights_them(r18, images):
    """A window whose samples would pass the budget keeps fewer per batch, each counting for those left out:
    the histograms' totals stay those of the full samples, and their ranges stay exact."""
    from rescompress.calibration.collect import collect_histograms
    from rescompress.quantization.calibrate import activation_amax

    batches = [images[:4], images[4:8], images[8:12], images[12:]]
    full, _, names, _ = _one_pass(r18, images, batches, 16, max_samples=4096)
    thin, seen, _, _ = _one_pass(r18, images, batches, 16, max_samples=4096, window_budget=4 * len(names) * 4 * 500)
    assert seen["images"] == 16  # the whole pass is the window here
    thinned = 0
    for n in names:
        a, b = thin[n], full[n]
        assert a.min == b.min and a.max == b.max
        assert a.count == pytest.approx(b.count, rel=0.02)
        if a.counts.dtype == np.float64:  # thinned: fractional counts
            thinned += 1
            assert a.counts.sum() == pytest.approx(a.count, rel=1e-9)
        assert activation_amax(a, "max", 128, 99.9) == activation_amax(b, "max", 128, 99.9)
        assert activation_amax(a, "percentile", 128, 99.0) == pytest.approx(
            activation_amax(b, "percentile", 128, 99.0), rel=0.1)
    assert thinned > 10
    # the FP32 file's histograms (as the model gives them) need no factors: binned at once, never thinned
    raw = [k for k in thin if k.endswith("/divided")]
    assert len(raw) > 10 and all(thin[k].counts.dtype == np.int64 and thin[k].count == full[k].count for k in raw)
    with pytest.raises(RescompressError, match="not both"):
        collect_histograms(r18, names, batches, divided={names[0]: np.ones(64)},
                           rescale=_rescale_stub(names[:1]))


def test_one_pass_with_fewer_images_than_the_window_decides_at_the_end(r18, images):
    hists, seen, names, _ = _one_pass(r18, images, [images[:12], images[12:]], 128, max_samples=997)
    assert seen["images"] == 16
    assert all(hists[n].count > 0 for n in names)


def _rescale_stub(tensors):
    from rescompress.calibration.collect import Rescale

    return Rescale(tuple(tensors), 4, lambda extremes, n: {})


def test_groups_need_known_channel_counts_and_rescale_needs_observed_tensors(r18, images):
    shapes = dict(tensor_shapes(r18))
    shapes["/maxpool/MaxPool_output_0"] = [None, None, 16, 16]  # a channel count shape inference could not tell
    groups = channel_groups(r18, shapes)
    assert len(groups) == 11 and all("/maxpool/MaxPool_output_0" not in g.tensors for g in groups)
    from rescompress.calibration.collect import collect_histograms

    with pytest.raises(RescompressError, match="not observed"):
        collect_histograms(r18, ["/relu/Relu_output_0"], [images], rescale=_rescale_stub(["/maxpool/MaxPool_output_0"]))


def test_calibration_fingerprint_does_not_depend_on_the_reading_order(images):
    """quantize reads the images that decide the factors first: the plan's data fingerprint names the images,
    not their order (with or without equalization), and changes with any image."""
    from torch.utils.data import TensorDataset

    from rescompress.quantization.pipeline import _HashingBatches, _loader

    ds = TensorDataset(torch.from_numpy(images), torch.zeros(len(images), dtype=torch.long))

    def fingerprint(order):
        batches = _HashingBatches(_loader(ds, order, 5), order)
        assert sum(len(x) for x, _ in batches) == len(order)
        return batches.fingerprint()

    plain = fingerprint(list(range(16)))
    assert fingerprint([3, 9, 0, *[i for i in range(16) if i not in (3, 9, 0)]]) == plain
    assert fingerprint(list(range(15))) != plain
