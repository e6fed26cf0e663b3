"""The ONNX Runtime file's space-to-depth stem: exactly the same outputs, an integer kernel, and no rewrite
where it does not apply."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rescompress.calibration.collect import make_session
from rescompress.profile import count_onnx_params
from rescompress.quantization.stem import STEM_KEY, rewrite_stem, space_to_depth_weight, stem_kernels
from rescompress.system import cpu_flags

# ORT's u8s8 kernels sum exactly in int32 with VNNI (x86) or dot-product instructions (Arm); plain AVX2 adds pairs
# of products with int16 saturation, so there the two forms can differ where a pair saturates.
EXACT_INT8 = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "asimddp"})


def _stem_graph(c=3, h=224, w=224, k=7, pads=(3, 3, 3, 3), stride=2, out=16, group=1, dilation=1, wzp=0,
                static=True, seed=0) -> onnx.ModelProto:
    """image -> Q -> DQ -> Conv(int8 per-channel weights, int32 bias) -> Relu -> Q -> DQ, as emit_qdq writes it."""
    rng = np.random.default_rng(seed)
    wq = rng.integers(-127, 128, (out, c // group, k, k)).astype(np.int8)
    ws = rng.uniform(0.001, 0.01, out).astype(np.float32)
    xs = np.float32(0.02)
    inits = [
        numpy_helper.from_array(xs, "x_scale"), numpy_helper.from_array(np.uint8(114), "x_zp"),
        numpy_helper.from_array(wq, "w_q"), numpy_helper.from_array(ws, "w_scale"),
        numpy_helper.from_array(np.full(out, wzp, np.int8), "w_zp"),
        numpy_helper.from_array(rng.integers(-2000, 2000, out).astype(np.int32), "b_q"),
        numpy_helper.from_array((xs * ws).astype(np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(out, np.int32), "b_zp"),
        numpy_helper.from_array(np.float32(0.05), "y_scale"), numpy_helper.from_array(np.uint8(0), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["x_q"], name="input_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="input_DequantizeLinear"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_DequantizeLinear", axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b_dq"], name="b_DequantizeLinear", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["conv"], name="/conv1/Conv", kernel_shape=[k, k],
                         strides=[stride, stride], pads=list(pads), group=group, dilations=[dilation, dilation]),
        helper.make_node("Relu", ["conv"], ["relu"], name="/relu/Relu"),
        helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zp"], ["y_q"], name="y_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["logits"], name="y_DequantizeLinear"),
    ]
    dims = ["batch", c, h, w] if static else ["batch", c, "height", "width"]
    g = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out, "oh", "ow"])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model, 1).run(None, {"input": x})[0]


def test_weight_taps_move_to_block_channels():
    w = np.arange(2 * 3 * 7 * 7, dtype=np.int64).reshape(2, 3, 7, 7)
    b = space_to_depth_weight(w)
    assert b.shape == (2, 12, 4, 4)
    for o, c, y, x in [(0, 0, 0, 0), (1, 2, 6, 5), (0, 1, 3, 4), (1, 0, 5, 6)]:
        assert b[o, ((y % 2) * 2 + x % 2) * 3 + c, y // 2, x // 2] == w[o, c, y, x]
    assert np.count_nonzero(b[:, 6:, 3, :]) == 0 and np.count_nonzero(b[:, [3, 4, 5, 9, 10, 11], :, 3]) == 0
    assert int(b.sum()) == int(w.sum())


@pytest.mark.parametrize(("c", "h", "w", "k", "pads"), [
    (3, 224, 224, 7, (3, 3, 3, 3)),  # torchvision's stem
    (3, 65, 47, 7, (3, 3, 3, 3)),  # odd sizes: one row/column of zero points is added
    (1, 32, 32, 3, (1, 1, 1, 1)),
    (4, 40, 24, 5, (2, 2, 2, 2)),  # even padding: no leading zero tap
    (3, 30, 30, 7, (3, 2, 1, 0)),  # uneven padding
    (3, 16, 16, 2, (0, 0, 0, 0)),
])
def test_rewritten_stem_gives_the_same_outputs_with_an_integer_kernel(c, h, w, k, pads, tmp_path):
    model = _stem_graph(c, h, w, k, pads)
    new, done = rewrite_stem(model)
    assert done is not None and done.channels == (c, 4 * c) and done.kernel == (k, k)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["strides"] == [1, 1] and list(attrs["kernel_shape"]) == list(done.block_kernel)
    assert [n.op_type for n in new.graph.node].count("SpaceToDepth") == 1
    assert json.loads({p.key: p.value for p in new.metadata_props}[STEM_KEY])["node"] == "/conv1/Conv"
    onnx.checker.check_model(new)
    assert count_onnx_params(new.graph, stem_kernels(new)) == count_onnx_params(model.graph)  # zero taps left out
    x = np.random.default_rng(1).normal(0.3, 1.2, (2, c, h, w)).astype(np.float32)
    before, after = _run(model, x), _run(new, x)
    assert before.shape == after.shape
    if EXACT_INT8:
        np.testing.assert_array_equal(after, before)  # the same integer sums: bit-identical

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 1 and "Conv" not in ops


@pytest.mark.parametrize("change", [
    {"stride": 1}, {"c": 16}, {"static": False}, {"c": 4, "group": 2}, {"dilation": 2}, {"wzp": 1},
])
def test_stems_it_does_not_apply_to_are_left_alone(change):
    model = _stem_graph(**{"c": 3, "h": 32, "w": 32, **change})
    new, done = rewrite_stem(model)
    assert done is None and new is model


def test_odd_size_whose_blocks_would_need_negative_padding_is_left_alone():
    """7 pixels, 7 taps, pads 3 and 0: two outputs, but the block form would read past the padded image end."""
    assert rewrite_stem(_stem_graph(c=3, h=7, w=7, k=7, pads=(3, 3, 0, 0)))[1] is None


def test_stem_without_zero_points_or_requantized_output_is_left_alone():
    model = _stem_graph(c=3, h=32, w=32)
    for n in model.graph.node:  # Q/DQ with the optional zero point left out (uint8, zero point 0)
        if n.name in ("input_QuantizeLinear", "input_DequantizeLinear"):
            del n.input[2]
    assert rewrite_stem(model)[1] is None
    model = _stem_graph(c=3, h=32, w=32)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.output[0].name = relu.output[0]  # the conv's output stays float: ORT would not fuse it
    del model.graph.node[-2:]
    assert rewrite_stem(model)[1] is None


def test_shared_image_tensors_and_unrelated_initializers_stay():
    """The image's dequantized tensor is also a graph output, and an unused initializer sits in the file."""
    model = _stem_graph(c=3, h=32, w=32)
    model.graph.output.append(helper.make_tensor_value_info("x_dq", TensorProto.FLOAT, ["batch", 3, 32, 32]))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(5, np.float32), "unrelated"))
    new, done = rewrite_stem(model)
    assert done is not None
    onnx.checker.check_model(new)
    names = {i.name for i in new.graph.initializer}
    assert "unrelated" in names and "w_q" not in names  # the old stem weight goes, nothing else
    assert "x_dq" in {o for n in new.graph.node for o in n.output}
    x = np.random.default_rng(2).normal(0, 1, (1, 3, 32, 32)).astype(np.float32)
    got, ref = make_session(new, 1).run(None, {"input": x}), make_session(model, 1).run(None, {"input": x})
    np.testing.assert_array_equal(got[1], ref[1])  # the image output is untouched
    if EXACT_INT8:
        np.testing.assert_array_equal(got[0], ref[0])


def test_a_float_stem_is_left_alone():
    """--exclude keeps the stem in float: no DequantizeLinear feeds its weight, so nothing is rewritten."""
    model = _stem_graph(c=3, h=32, w=32)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.initializer.append(numpy_helper.from_array(np.ones((16, 3, 7, 7), np.float32), "w_float"))
    conv.input[1] = "w_float"
    assert rewrite_stem(model)[1] is None
