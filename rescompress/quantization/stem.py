"""Space-to-depth stem for the ONNX Runtime file: the same integer convolution, laid out for its int8 kernel.

A ResNet's stem reads the image (1-4 channels) with a 7x7 stride-2 convolution. ONNX Runtime's int8
convolution kernel packs input channels in groups of four and walks the kernel window one position at a
time, so three channels over 49 positions leave most of each vector empty: profiled on resnet50 at 224x224
(2 cores, AVX-512 VNNI), the int8 stem was the slowest node of the INT8 model and hardly faster than the FP32
stem (``benchmarks/bench_quantize.py --part resnet50`` times the whole file with and without this rewrite).

A stride-2 convolution is exactly a stride-1 convolution over 2x2 blocks: block ``(i, j)`` of the image
becomes one pixel of ``4C`` channels in ``(dy, dx, c)`` order (ONNX's SpaceToDepth), and the ``k x k`` kernel
becomes a ``ceil(k'/2) x ceil(k'/2)`` kernel over those channels, where ``k' = k + 1`` when the padding is odd
(a leading zero tap aligns the window with the blocks, so the padding becomes whole blocks, which the
convolution pads with the zero point as before). The float image is rearranged and then quantized with its
own scale and zero point, which gives the integers that rearranging the quantized image would (float
SpaceToDepth runs on every ONNX Runtime version, uint8 only on recent ones); the int8 weight levels are moved,
not re-rounded. The block convolution sums the same integer products as the original plus products with zero
weights, so where ONNX Runtime sums in exact int32 (AVX-512 VNNI, AVX-VNNI, Arm dot-product instructions) the
file's outputs are bit-identical (tested). On plain AVX2 its u8s8 kernels add pairs of products with int16
saturation, in both forms, and the pairs differ. The TensorRT file is not rewritten: TensorRT picks its own
stem kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rescompress.quantization.emit import set_metadata
from rescompress.quantization.placement import GraphIndex

STEM_KEY = "rescompress.quantization.stem_space_to_depth"  # metadata of a rewritten file: the rewrite, as JSON
MAX_STEM_CHANNELS = 4  # image inputs; wider inputs fill the kernel's vectors without help


@dataclass(frozen=True)
class StemRewrite:
    node: str
    kernel: tuple[int, int]  # the stride-2 kernel (height, width)
    block_kernel: tuple[int, int]  # the stride-1 kernel over 2x2 blocks
    channels: tuple[int, int]  # C -> 4C

    def to_dict(self) -> dict:
        return {"node": self.node, "kernel": list(self.kernel), "block_kernel": list(self.block_kernel),
                "channels": list(self.channels)}


def stem_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """``{conv node: weights per output channel}`` for a stem this module rewrote, from the file's metadata.

    The rewritten kernel also stores zero taps (192 per output channel for a 7x7 stem on 3 channels, against
    147): parameter and MAC counts take the real ones, so an INT8 file counts what its FP32 file does."""
    raw = {p.key: p.value for p in model.metadata_props}.get(STEM_KEY)
    if not raw:
        return {}
    d = json.loads(raw)
    return {d["node"]: d["channels"][0] * d["kernel"][0] * d["kernel"][1]}


def space_to_depth_weight(w: np.ndarray) -> np.ndarray:
    """(O, C, kh, kw) stride-2 weights -> (O, 4C, ceil(kh/2), ceil(kw/2)) stride-1 weights, channels (dy, dx, c)."""
    o, c, kh, kw = w.shape
    bh, bw = -(-kh // 2), -(-kw // 2)
    padded = np.zeros((o, c, 2 * bh, 2 * bw), dtype=w.dtype)
    padded[:, :, :kh, :kw] = w
    return padded.reshape(o, c, bh, 2, bw, 2).transpose(0, 3, 5, 1, 2, 4).reshape(o, 4 * c, bh, bw)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_hw(model: onnx.ModelProto, name: str) -> tuple[int, int] | None:
    for i in model.graph.input:
        if i.name == name:
            dims = i.type.tensor_type.shape.dim
            if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
                return dims[2].dim_value, dims[3].dim_value
    return None


def _requantized(idx: GraphIndex, tensor: str) -> bool:
    """Does ``tensor`` feed only QuantizeLinear nodes, directly or through one Relu? (ORT then fuses the conv into
    QLinearConv; a conv whose output stays float would run as a float conv, and sum in another order.)"""
    users = [n for n, _ in idx.consumers.get(tensor, [])]
    if tensor in idx.graph_outputs or not users:
        return False
    if len(users) == 1 and users[0].op_type == "Relu":
        return _requantized(idx, users[0].output[0])
    return all(n.op_type == "QuantizeLinear" for n in users)


def rewrite_stem(model: onnx.ModelProto) -> tuple[onnx.ModelProto, StemRewrite | None]:
    """Rewrite the first stride-2 int8 convolution on the quantized image input (see the module docstring).

    Returns ``(model, None)`` unchanged when the graph has no such convolution: the float image input's
    QuantizeLinear -> DequantizeLinear (one scale and zero point, both initializers, the same in both) -> Conv
    with int8 weights behind a DequantizeLinear whose zero points are 0, stride 2, no dilation, one group, at
    most four input channels, explicit pads, an output that is quantized again (so ONNX Runtime fuses it into
    QLinearConv), and a static image height and width.
    """
    idx = GraphIndex(model)
    producer, inits = idx.producer, idx.initializers

    def init(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for conv in idx.nodes:
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        a = _attrs(conv)
        dq_x, dq_w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = producer.get(dq_x.input[0])
        if (q_x is None or q_x.op_type != "QuantizeLinear" or len(dq_x.input) < 3 or len(dq_w.input) < 3
                or list(q_x.input[1:3]) != list(dq_x.input[1:3])):
            continue
        hw = _static_hw(model, q_x.input[0])
        w, wzp, xscale = init(dq_w.input[0]), init(dq_w.input[2]), init(dq_x.input[1])
        if (hw is None or w is None or wzp is None or xscale is None or dq_x.input[2] not in inits
                or w.ndim != 4 or w.dtype != np.int8 or w.shape[1] > MAX_STEM_CHANNELS or np.any(wzp != 0)
                or xscale.size != 1 or list(a.get("strides", [1, 1])) != [2, 2]
                or any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("group", 1) != 1
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or not _requantized(idx, conv.output[0])):
            continue
        done = _rewritten(idx, conv, q_x, dq_x, dq_w, w, hw, list(a.get("pads", [0, 0, 0, 0])))
        if done is not None:
            return done
    return model, None


def _block_geometry(size: int, pad_begin: int, pad_end: int, k: int) -> tuple[int, int, int, int] | None:
    """One spatial axis: (leading zero taps, block kernel, block pad begin, block pad end), or None.

    Output ``o`` of the stride-2 convolution reads pixels ``2o - pad_begin + t``, ``t < k``. With one leading
    zero tap when ``pad_begin`` is odd, those pixels fall in blocks ``o - pad_begin' + t' // 2`` at phase
    ``t' % 2``, so the block convolution needs no explicit padding of the image (only of whole blocks, which
    its own zero-point padding does). The image is padded by one row or column only when its size is odd.
    """
    shift = pad_begin % 2
    kb = -(-(k + shift) // 2)
    pb = (pad_begin + shift) // 2
    out = (size + pad_begin + pad_end - k) // 2 + 1
    pe = out - 1 + kb - (size + size % 2) // 2 - pb
    return None if pe < 0 or out < 1 else (shift, kb, pb, pe)


def _rewritten(idx: GraphIndex, conv, q_x, dq_x, dq_w, w, hw, pads) -> tuple[onnx.ModelProto, StemRewrite] | None:
    o, c, kh, kw = w.shape
    pt, pl, pb, pr = pads
    gh, gw = _block_geometry(hw[0], pt, pb, kh), _block_geometry(hw[1], pl, pr, kw)
    if gh is None or gw is None:
        return None
    (sh, kbh, pbh, peh), (sw, kbw, pbw, pew) = gh, gw
    taps = np.zeros((o, c, 2 * kbh, 2 * kbw), dtype=w.dtype)
    taps[:, :, sh:sh + kh, sw:sw + kw] = w
    name = conv.name or conv.output[0]
    base = f"{name}_s2d"
    image, scale, zp = q_x.input[0], dq_x.input[1], dq_x.input[2]
    new_inits = [numpy_helper.from_array(space_to_depth_weight(taps), f"{base}_weight_quantized")]
    nodes = []
    if hw[0] % 2 or hw[1] % 2:  # SpaceToDepth needs even sizes: one more row/column of zeros (the zero point)
        new_inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, hw[0] % 2, hw[1] % 2], np.int64),
                                                 f"{base}_pads"))
        nodes.append(helper.make_node("Pad", [image, f"{base}_pads"], [f"{base}_padded"], name=f"{base}_Pad"))
        image = f"{base}_padded"
    # Rearranging the float image and quantizing it per tensor gives the integers that rearranging the quantized
    # image would, and float SpaceToDepth runs on every ONNX Runtime version (uint8 only on recent ones).
    nodes += [
        helper.make_node("SpaceToDepth", [image], [f"{base}_blocks"], name=f"{base}_SpaceToDepth", blocksize=2),
        helper.make_node("QuantizeLinear", [f"{base}_blocks", scale, zp], [f"{base}_quantized"],
                         name=f"{base}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{base}_quantized", scale, zp], [f"{base}_dequantized"],
                         name=f"{base}_DequantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{base}_weight_quantized", *dq_w.input[1:]],
                         [f"{base}_weight_dequantized"], name=f"{base}_weight_DequantizeLinear", axis=0),
    ]
    m = onnx.ModelProto()
    m.CopyFrom(idx.model)
    g = m.graph
    out = []
    for n in g.node:
        if n.name == conv.name and list(n.output) == list(conv.output):
            out.extend(nodes)
            n.input[0], n.input[1] = f"{base}_dequantized", f"{base}_weight_dequantized"
            for a in list(n.attribute):
                if a.name in ("kernel_shape", "strides", "pads"):
                    n.attribute.remove(a)
            n.attribute.extend([helper.make_attribute("kernel_shape", [kbh, kbw]),
                                helper.make_attribute("strides", [1, 1]),
                                helper.make_attribute("pads", [pbh, pbw, peh, pew])])
        out.append(n)
    # What only the old stem read goes: its image Q/DQ pair and its weight levels (nothing else is touched).
    def only_for(tensor: str, reader: onnx.NodeProto) -> bool:
        return tensor not in idx.graph_outputs and [id(n) for n, _ in idx.consumers.get(tensor, [])] == [id(reader)]

    drop = set()
    if only_for(dq_x.output[0], conv):
        drop.add(dq_x.output[0])
        if only_for(q_x.output[0], dq_x):
            drop.add(q_x.output[0])
    if only_for(dq_w.output[0], conv):
        drop.add(dq_w.output[0])
    out = [n for n in out if not (set(n.output) & drop)]
    del g.node[:]
    g.node.extend(out)
    used = {t for n in g.node for t in n.input}
    stale = {dq_w.input[0]} - used
    kept = [i for i in g.initializer if i.name not in stale]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    done = StemRewrite(name, (kh, kw), (kbh, kbw), (c, 4 * c))
    set_metadata(m, STEM_KEY, json.dumps(done.to_dict()))
    return m, done
