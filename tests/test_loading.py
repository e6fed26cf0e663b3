"""load_model on every accepted file form, arch inference on every listed ResNet, and refusals.

Models are real torchvision / reference ResNets with random weights and randomized BatchNorm statistics
(so a BN buffer that failed to load would change the outputs); every round trip compares logits exactly.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet as torchvision_resnet

from rescompress.checkpoint import CheckpointHeader, save_checkpoint
from rescompress.errors import UnsupportedModelError
from rescompress.loading import (
    LoadedModel,
    _differs_from_standard,
    infer_resnet_spec,
    is_onnx_path,
    load_model,
    strip_prefixes,
    unsafe_globals,
)
from rescompress.models import ARCH_NAMES, Stem, build_model
from rescompress.profile import count_macs, count_params
from rescompress.spec import get_preset


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms (fresh BNs are identity-like and would hide load bugs)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def _logits(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(x)


def assert_same_logits(loaded: nn.Module, reference: nn.Module, shape: tuple[int, ...]) -> None:
    """The loaded model computes the reference's function. Not bit for bit: torch's CPU convolutions may sum in
    another order for weights at another memory alignment (a resnet18 loaded from safetensors differed by 6e-7
    in its logits on an AVX-512 machine); a wrong or missing weight moves the logits by far more than 1e-5."""
    got, want = _logits(loaded, shape), _logits(reference, shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))


def _model(arch: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _randomize_bn(build_model(arch, num_classes, in_channels))


def _probe_shape(arch: str, in_channels: int) -> tuple[int, int, int, int]:
    # 32x32 is the smallest input every listed ResNet accepts (layer4 of torchvision's sees 1x1); small
    # inputs keep the large variants fast.
    return (1, in_channels, 32, 32)


# -------------------------------------------------------------------------------- arch inference
_HEAVY = {"resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2"}
# Class count and input channels vary across the table so both are inferred, not defaulted.
_VARIANTS = [
    pytest.param(arch, nc, ch, marks=[pytest.mark.slow] if arch in _HEAVY else [], id=arch)
    for arch, nc, ch in zip(
        ARCH_NAMES,
        [10, 100, 7, 1000, 10, 37, 1000, 5, 10, 3, 1000, 12, 2],
        [1, 3, 3, 3, 1, 3, 3, 1, 3, 3, 1, 3, 3],
        strict=True,
    )
]


@pytest.mark.parametrize(("arch", "num_classes", "in_channels"), _VARIANTS)
def test_state_dict_arch_inferred_for_every_variant(tmp_path, arch, num_classes, in_channels):
    model = _model(arch, num_classes, in_channels)
    path = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), path)
    shape = _probe_shape(arch, in_channels)
    expected = _logits(model, shape)

    loaded = load_model(path, input_size=shape[-1])

    assert (loaded.arch, loaded.num_classes, loaded.in_channels) == (arch, num_classes, in_channels)
    assert loaded.source_format == "state_dict" and not loaded.pruned
    assert not loaded.module.training
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())
    assert loaded.params == count_params(model)
    if arch not in _HEAVY:  # one forward fewer for the big ones; the counting code is the same
        assert loaded.macs == count_macs(model, shape)
    torch.testing.assert_close(_logits(loaded.module, shape), expected, rtol=0,
                               atol=1e-5 * max(1.0, float(expected.abs().max())))  # see assert_same_logits


def test_spec_reads_resnext_groups_and_width():
    with torch.device("meta"):
        spec = infer_resnet_spec(build_model("resnext101_64x4d").state_dict())
        wide = infer_resnet_spec(build_model("wide_resnet50_2", 3, 1).state_dict())
    assert (spec.block, spec.layers, spec.groups, spec.width_per_group) == ("bottleneck", (3, 4, 23, 3), 64, 4)
    assert (wide.groups, wide.width_per_group, wide.num_classes, wide.in_channels) == (1, 128, 3, 1)


def test_unnamed_depth_builds_generic_resnet(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    model = _randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4))
    path = tmp_path / "resnet10.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, input_size=32)
    assert loaded.spec is not None and loaded.spec.layers == (1, 1, 1, 1) and loaded.spec.arch is None
    assert loaded.arch == "resnet_basic_1-1-1-1_g1w64" and loaded.num_classes == 4
    assert_same_logits(loaded.module, model, (1, 3, 32, 32))


# -------------------------------------------------------------------------------- wrapped forms
@pytest.fixture(scope="module")
def r20() -> nn.Module:
    torch.manual_seed(3)
    return _model("resnet20", 10, 1)


_SHAPE = (2, 1, 32, 32)


def _sd_with_prefix(model: nn.Module, prefix: str) -> dict:
    return {prefix + k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda m: {"state_dict": m.state_dict(), "epoch": 7, "best_acc": 0.9}, id="state_dict"),
        pytest.param(lambda m: {"model": m.state_dict()}, id="model"),
        pytest.param(
            lambda m: {
                "model_state_dict": m.state_dict(),
                "optimizer_state_dict": torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9).state_dict(),
                "epoch": 3,
            },
            id="model_state_dict+optimizer",
        ),
        pytest.param(lambda m: _sd_with_prefix(m, "module."), id="module-prefix"),
        pytest.param(lambda m: _sd_with_prefix(m, "_orig_mod."), id="compile-prefix"),
        pytest.param(lambda m: {"state_dict": _sd_with_prefix(m, "module._orig_mod.")}, id="wrapped+prefixes"),
        pytest.param(lambda m: {"model": m, "epoch": 1}, id="wrapped-module"),
    ],
)
def test_wrapped_forms_load(tmp_path, r20, wrap):
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(r20), path)
    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes, loaded.in_channels) == ("resnet20", 10, 1)
    assert_same_logits(loaded.module, r20, _SHAPE)


def test_strip_prefixes_only_when_every_key_has_it():
    t = torch.zeros(1)
    assert set(strip_prefixes({"module.a": t, "module.b": t})) == {"a", "b"}
    assert set(strip_prefixes({"module.a": t, "b": t})) == {"module.a", "b"}


def test_legacy_torch_format_state_dict(tmp_path, r20):
    path = tmp_path / "legacy.pt"
    torch.save(r20.state_dict(), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    loaded = load_model(path)
    assert loaded.arch == "resnet20"
    assert_same_logits(loaded.module, r20, _SHAPE)


def test_plain_safetensors_state_dict(tmp_path):
    model = _model("resnet18", 10, 1)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, input_size=32)
    assert (loaded.arch, loaded.num_classes, loaded.in_channels, loaded.source_format) == (
        "resnet18", 10, 1, "state_dict")
    assert_same_logits(loaded.module, model, (1, 1, 32, 32))


# -------------------------------------------------------------------------------- default preprocessing
def test_default_preprocess_by_arch_and_channels(tmp_path):
    cases = [("resnet20", 3, "cifar", 3), ("resnet20", 1, "fashion-mnist", 1), ("resnet18", 1, "imagenet", 1)]
    for arch, ch, preset, channels in cases:
        path = tmp_path / f"{arch}_{ch}.pt"
        torch.save(build_model(arch, 10, ch).state_dict(), path)
        pre = load_model(path, input_size=32 if preset == "imagenet" else None).preprocess
        assert (pre.preset, pre.channels) == (preset, channels)
    assert pre.mean == (pytest.approx(sum(get_preset("imagenet").mean) / 3),)
    assert pre.size == (32, 32) and pre.resize == round(256 * 32 / 224)


# -------------------------------------------------------------------------------- arch override
def test_arch_override_accepts_matching_and_rejects_wrong(tmp_path, r20):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    assert load_model(path, arch="resnet20").arch == "resnet20"
    with pytest.raises(UnsupportedModelError, match=r"do not fit --arch resnet56 \(it looks like resnet20"):
        load_model(path, arch="resnet56")
    with pytest.raises(UnsupportedModelError, match=r"do not fit --arch resnet18"):
        load_model(path, arch="resnet18")
    with pytest.raises(UnsupportedModelError, match="unknown --arch 'resnet9000'"):
        load_model(path, arch="resnet9000")


# -------------------------------------------------------------------------------- pickled modules
@pytest.mark.parametrize(("arch", "ch"), [("resnet18", 3), ("resnet20", 1)])
def test_full_pickled_resnet_loads_without_trust(tmp_path, arch, ch):
    model = _model(arch, 10, ch)
    path = tmp_path / "full.pt"
    torch.save(model, path)
    shape = _probe_shape(arch, ch)
    loaded = load_model(path, input_size=shape[-1])
    assert loaded.source_format == "pickled_module"
    assert (loaded.arch, loaded.num_classes, loaded.in_channels) == (arch, 10, ch)
    assert type(loaded.module) is type(model) and not loaded.module.training
    assert_same_logits(loaded.module, model, shape)


def test_wider_classifier_from_custom_pooling_is_not_called_pruned(tmp_path):
    """A 2x2 adaptive pool feeds fc 4x the features: the body has the standard widths, so not 'pruned'."""
    model = torchvision_resnet.resnet18(num_classes=10).eval()
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.fc = nn.Linear(4 * 512, 10)
    torch.save(model, tmp_path / "pool2.pt")
    loaded = load_model(tmp_path / "pool2.pt", input_size=64)
    assert loaded.arch == "resnet18" and not loaded.pruned and loaded.num_classes == 10
    state = model.state_dict()
    assert not _differs_from_standard(infer_resnet_spec(state), state)
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:48]  # a narrower conv still counts
    assert _differs_from_standard(infer_resnet_spec(state), state)


class _Head(nn.Module):
    """A module class outside the allow-list (stands in for a user's own model class)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_unknown_module_class_refused_then_trusted(tmp_path, caplog):
    path = tmp_path / "custom.pt"
    torch.save(_Head(), path)
    with pytest.raises(UnsupportedModelError, match=r"refused to unpickle .*_Head.*--trust-pickle"):
        load_model(path)
    with caplog.at_level("WARNING", logger="rescompress.loading"):
        loaded = load_model(path, trust_pickle=True, input_size=16)
    assert "weights_only=False" in caplog.text
    assert loaded.source_format == "pickle" and loaded.arch == "_Head"
    assert (loaded.num_classes, loaded.in_channels) == (6, 3)
    assert loaded.macs == count_macs(loaded.module, (1, 3, 16, 16))


class _Touch:
    """A payload that creates ``path`` when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _System:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_Touch, _System])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_refused_and_nothing_runs(tmp_path, payload, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": build_model("resnet20").state_dict(), "x": payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(UnsupportedModelError, match=r"refused to unpickle .*(open|system).*--trust-pickle"):
        load_model(path)
    assert not marker.exists()
    assert any(name.endswith(("open", "system")) for name in unsafe_globals(path))
    assert not marker.exists()


def test_malicious_pickle_with_trust_runs_and_is_documented(tmp_path):
    """--trust-pickle means the pickle's code runs: the marker appears; a non-model object is still refused."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Touch(str(marker))}, path)
    with pytest.raises(UnsupportedModelError, match="holds a dict with keys"):
        load_model(path, trust_pickle=True)
    assert marker.exists()


# -------------------------------------------------------------------------------- TorchScript
def test_torchscript_resnet_rebuilt_eager(tmp_path):
    model = _model("resnet18", 10, 3)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(path))
    loaded = load_model(path, input_size=32)
    assert loaded.source_format == "torchscript" and loaded.arch == "resnet18" and loaded.num_classes == 10
    assert not isinstance(loaded.module, torch.jit.ScriptModule)
    assert_same_logits(loaded.module, model, (1, 3, 32, 32))


def test_torchscript_non_resnet_kept_scripted(tmp_path):
    model = _Head().eval()
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(path))
    loaded = load_model(path, input_size=32)
    assert loaded.source_format == "torchscript" and loaded.arch == "torchscript"
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert (loaded.num_classes, loaded.in_channels) == (6, 3)
    assert loaded.macs == count_macs(model, (1, 3, 32, 32))
    assert torch.allclose(_logits(loaded.module, (1, 3, 32, 32)), _logits(model, (1, 3, 32, 32)))


# -------------------------------------------------------------------------------- project checkpoints
def _shrink_first_block(model: nn.Module, keep: int) -> nn.Module:
    """Prune layer1.0.conv1's output channels to ``keep`` by hand (conv1 out, bn1, conv2 in)."""
    block = model.layer1[0]
    idx = torch.arange(keep)
    old1, bn, old2 = block.conv1, block.bn1, block.conv2
    new1 = nn.Conv2d(old1.in_channels, keep, old1.kernel_size, old1.stride, old1.padding, bias=False)
    new1.weight.data = old1.weight.data[idx].clone()
    new_bn = nn.BatchNorm2d(keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new_bn, name).data = getattr(bn, name).data[idx].clone()
    new2 = nn.Conv2d(keep, old2.out_channels, old2.kernel_size, old2.stride, old2.padding, bias=False)
    new2.weight.data = old2.weight.data[:, idx].clone()
    block.conv1, block.bn1, block.conv2 = new1, new_bn, new2
    return model.eval()


def test_project_checkpoint_and_pruned_checkpoint(tmp_path, r20):
    pre = get_preset("fashion-mnist")
    plain = save_checkpoint(r20, tmp_path / "r20.safetensors", CheckpointHeader("resnet20", 10, 1, pre))
    loaded = load_model(plain)
    assert loaded.source_format == "checkpoint" and loaded.preprocess == pre and not loaded.pruned
    assert_same_logits(loaded.module, r20, _SHAPE)

    pruned = _shrink_first_block(_model("resnet20", 10, 1), keep=9)
    path = save_checkpoint(pruned, tmp_path / "pruned.safetensors",
                           CheckpointHeader("resnet20", 10, 1, pre, pruned=True))
    loaded = load_model(path)
    assert loaded.source_format == "checkpoint" and loaded.pruned and loaded.arch == "resnet20"
    assert loaded.module.layer1[0].conv1.out_channels == 9
    assert loaded.params == count_params(pruned) < count_params(r20)
    assert_same_logits(loaded.module, pruned, _SHAPE)


def test_pruned_plain_state_dicts_infer_unpruned_arch(tmp_path):
    shape = (1, 3, 32, 32)
    for arch in ("resnet18", "resnet50"):
        pruned = _shrink_first_block(_model(arch, 10, 3), keep=40)
        path = tmp_path / f"{arch}_pruned.pt"
        torch.save(pruned.state_dict(), path)
        loaded = load_model(path, input_size=32)
        # resnet50 with 40 channels in layer1.0.conv1 reads as "width 40": the nearest bound is resnet50.
        assert loaded.arch == arch and loaded.pruned
        assert loaded.params == count_params(pruned)
        assert_same_logits(loaded.module, pruned, shape)


# -------------------------------------------------------------------------------- bad files
def _onnx_file(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_bad_files_each_get_a_clear_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pt"
    text.write_text("not a model at all")
    good = tmp_path / "good.pt"
    torch.save(build_model("resnet20").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    st = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("resnet20").state_dict().items()}, str(st))
    st_trunc = tmp_path / "truncated.safetensors"
    st_trunc.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    not_resnet = tmp_path / "mlp.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4), "head.weight": torch.zeros(2, 4)}, not_resnet)
    random_dict = tmp_path / "dict.pt"
    torch.save({"epoch": 3, "lr": 0.1}, random_dict)
    onnx_path = _onnx_file(tmp_path / "m.onnx")
    onnx_renamed = _onnx_file(tmp_path / "m.bin")

    cases = {
        tmp_path / "missing.pt": "does not exist",
        tmp_path: "is a directory",
        empty: r"is empty \(0 bytes\)",
        text: r"not a PyTorch model file \(it starts with b'not a mo'\)",
        truncated: "truncated or corrupt",
        st_trunc: "corrupt or truncated safetensors",
        not_resnet: r"not a torchvision-style ResNet .*'encoder.weight'",
        random_dict: r"holds a dict with keys \['epoch', 'lr'\]",
        onnx_path: "is an ONNX model.*inspect, quantize, evaluate, benchmark",
        onnx_renamed: "is an ONNX model",
    }
    for path, message in cases.items():
        with pytest.raises(UnsupportedModelError, match=message):
            load_model(path)
    assert is_onnx_path(onnx_renamed) and not is_onnx_path(good) and not is_onnx_path(st)


def test_loaded_model_to_dict_is_json_ready(tmp_path, r20):
    import json

    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    d = json.loads(json.dumps(loaded.to_dict()))
    assert d["arch"] == "resnet20" and d["preprocess"]["preset"] == "fashion-mnist"
    assert d["macs"] == count_macs(r20, (1, 1, 28, 28)) and d["spec"]["layers"] == [3, 3, 3]


def test_dataparallel_and_custom_head_pickles_load_without_trust(tmp_path):
    model = _model("resnet18", 10, 3)
    dp = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(model), dp)
    loaded = load_model(dp, input_size=32)
    assert loaded.source_format == "pickled_module" and loaded.arch == "resnet18"
    assert not isinstance(loaded.module, nn.DataParallel)
    assert_same_logits(loaded.module, model, (1, 3, 32, 32))

    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 7))
    head = tmp_path / "head.pt"
    torch.save(model.eval(), head)
    loaded = load_model(head, input_size=32)
    assert (loaded.arch, loaded.num_classes) == ("resnet18", 7)
    assert any("custom classifier head" in n for n in loaded.notes)
    # The same head as a state_dict (torch.save, or safetensors with a DataParallel prefix): the one Linear
    # becomes a plain fc, which computes exactly what the Sequential does at inference.
    torch.save(model.state_dict(), tmp_path / "head_sd.pt")
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "head_sd.safetensors")
    for name in ("head_sd.pt", "head_sd.safetensors"):
        loaded = load_model(tmp_path / name, input_size=32)
        assert (loaded.arch, loaded.num_classes, loaded.source_format) == ("resnet18", 7, "state_dict")
        assert isinstance(loaded.module.fc, nn.Linear) and any("loaded as a plain fc" in n for n in loaded.notes)
        torch.testing.assert_close(_logits(loaded.module, (2, 3, 32, 32)), _logits(model, (2, 3, 32, 32)))

    model.fc = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 7))  # an MLP head: no plain fc
    torch.save(model.state_dict(), tmp_path / "mlp_sd.pt")
    with pytest.raises(UnsupportedModelError, match=r"unexpected keys \['fc.0.bias', 'fc.0.weight', 'fc.2.bias'"):
        load_model(tmp_path / "mlp_sd.pt")


def test_folded_checkpoint_loads_with_note(tmp_path, r20):
    from rescompress.folding import fold_batchnorm

    folded = fold_batchnorm(r20, input_shape=(1, 32, 32)).model
    header = CheckpointHeader("resnet20", 10, 1, get_preset("fashion-mnist"), folded=True)
    path = save_checkpoint(folded, tmp_path / "folded.safetensors", header)
    loaded = load_model(path)
    assert loaded.source_format == "checkpoint" and any("folded" in n for n in loaded.notes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.module.modules())
    assert_same_logits(loaded.module, folded, _SHAPE)


def test_half_precision_files_load_as_float32(tmp_path, r20):
    half_sd = {k: v.half() if v.is_floating_point() else v for k, v in r20.state_dict().items()}
    torch.save(half_sd, tmp_path / "half_sd.pt")
    torch.save(_model("resnet20", 10, 1).half(), tmp_path / "half_module.pt")
    for name in ("half_sd.pt", "half_module.pt"):
        loaded = load_model(tmp_path / name)
        assert all(t.dtype == torch.float32 for t in loaded.module.state_dict().values() if t.is_floating_point())
        assert loaded.macs == count_macs(r20, (1, 1, 28, 28))
    reference = build_model("resnet20", 10, 1)
    reference.load_state_dict({k: v.float() for k, v in half_sd.items()})
    loaded = load_model(tmp_path / "half_sd.pt")
    assert_same_logits(loaded.module, reference.eval(), _SHAPE)
    assert any("float32" in n for n in load_model(tmp_path / "half_module.pt").notes)


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "rescompress/assets/resnet20_fashion_mnist.safetensors").exists(),
    reason="bundled reference model not trained yet",
)
def test_bundled_reference_model(reference_checkpoint):
    loaded = load_model(reference_checkpoint)
    assert (loaded.arch, loaded.num_classes, loaded.in_channels) == ("resnet20", 10, 1)
    assert loaded.source_format == "checkpoint" and loaded.preprocess.preset == "fashion-mnist"
    assert loaded.macs == count_macs(build_model("resnet20", 10, 1), loaded.preprocess.input_shape(1))


# ------------------------------------------------------------------------------------------ stems and wrappers
def _small_image_resnet18(maxpool: bool = False) -> nn.Module:
    """torchvision resnet18 adapted to 32x32 images the usual way: 3x3 stride-1 conv1, max-pool removed."""
    model = build_model("resnet18", 10, 3)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    if not maxpool:
        model.maxpool = nn.Identity()
    return _randomize_bn(model)


def test_small_image_stem_state_dict_loads_with_assumption_noted(tmp_path):
    model = _small_image_resnet18()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.arch == "resnet18" and not loaded.pruned
    assert loaded.spec.stem == Stem(3, 1, 1, False)
    assert any("assumed a 3x3 stride-1 stem without max-pool" in n for n in loaded.notes)
    assert loaded.preprocess.size == (32, 32)  # small-image defaults, not 224x224
    assert isinstance(loaded.module.maxpool, nn.Identity)
    assert_same_logits(loaded.module, model, (2, 3, 32, 32))


def test_small_image_stem_from_module_and_torchscript_is_the_real_one(tmp_path):
    """A pickled module or a TorchScript archive shows the real stem: one with a max-pool is found too."""
    for maxpool in (False, True):
        model = _small_image_resnet18(maxpool)
        torch.save(model, tmp_path / "full.pt")
        torch.jit.script(model).save(str(tmp_path / "ts.pt"))
        for name in ("full.pt", "ts.pt"):
            loaded = load_model(tmp_path / name)
            assert loaded.spec.stem == Stem(3, 1, 1, maxpool), name
            assert not loaded.pruned
            assert isinstance(loaded.module, torchvision_resnet.ResNet)
            assert_same_logits(loaded.module, model, (2, 3, 32, 32))


def test_small_image_stem_survives_pruned_checkpoint_round_trip(tmp_path):
    from rescompress.pruning.save import save_pruned

    model = _small_image_resnet18()
    model.layer1[0].conv1 = nn.Conv2d(64, 48, 3, 1, 1, bias=False)  # a pruned width
    model.layer1[0].bn1 = _randomize_bn(nn.BatchNorm2d(48))
    model.layer1[0].conv2 = nn.Conv2d(48, 64, 3, 1, 1, bias=False)
    save_pruned(model.eval(), tmp_path / "p.safetensors", arch="resnet18", num_classes=10, in_channels=3,
                preprocess=get_preset("cifar"))
    loaded = load_model(tmp_path / "p.safetensors")
    assert loaded.pruned and loaded.module.conv1.stride == (1, 1)
    assert isinstance(loaded.module.maxpool, nn.Identity)
    assert any("3x3 stride-1 stem without max-pool" in n for n in loaded.notes)
    assert_same_logits(loaded.module, model, (2, 3, 32, 32))


def test_state_dict_under_any_prefix_and_beside_other_keys(tmp_path):
    model = _model("resnet18")
    sd = model.state_dict()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.ckpt")
    a = load_model(tmp_path / "a.ckpt")
    # A Lightning module's state_dict: the network plus a loss's buffer.
    mixed = {**{f"net.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(10)}
    torch.save({"state_dict": mixed}, tmp_path / "b.ckpt")
    b = load_model(tmp_path / "b.ckpt")
    assert any("under 'net.'; 1 other key(s) ignored" in n for n in b.notes)
    for loaded in (a, b):
        assert loaded.arch == "resnet18"
        assert_same_logits(loaded.module, model, (1, 3, 32, 32))
    with_copy = {**sd, **{f"ema.{k}": torch.zeros_like(v) for k, v in sd.items()}}
    torch.save(with_copy, tmp_path / "c.pth")
    c = load_model(tmp_path / "c.pth")
    assert any("copy under 'ema.' ignored" in n for n in c.notes)
    assert_same_logits(c.module, model, (1, 3, 32, 32))
    two = {**{f"teacher.{k}": v for k, v in sd.items()}, **{f"student.{k}": v for k, v in sd.items()}}
    torch.save(two, tmp_path / "two.pth")
    with pytest.raises(UnsupportedModelError, match=r"holds 2 ResNets \(under 'student.', 'teacher.'\)"):
        load_model(tmp_path / "two.pth")


def test_single_weights_entry_under_any_key_and_missing_step_counters(tmp_path):
    model = _model("resnet18")
    sd = model.state_dict()
    torch.save({"ema_state_dict": sd, "epoch": 7, "best_acc": 0.9}, tmp_path / "ema.pth")
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) < len(sd)
    torch.save(no_counters, tmp_path / "old.pth")
    for name in ("ema.pth", "old.pth"):
        loaded = load_model(tmp_path / name)
        assert loaded.arch == "resnet18"
        assert_same_logits(loaded.module, model, (1, 3, 32, 32))


def test_training_checkpoints_with_arguments_and_numpy_values_load_without_trust(tmp_path):
    """timm / the PyTorch ImageNet example save an argparse.Namespace, optimizer state and numpy metrics
    beside the weights: plain data, accepted by the weights-only loader."""
    import argparse

    import numpy as np

    model = _model("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "args": argparse.Namespace(lr=0.1, model="resnet18"), "best_acc1": np.float64(0.91),
                "history": np.arange(4, dtype=np.float32), "version": 2}, tmp_path / "train.pth.tar")
    loaded = load_model(tmp_path / "train.pth.tar")
    assert loaded.arch == "resnet18" and loaded.source_format == "state_dict"
    assert_same_logits(loaded.module, model, (1, 3, 32, 32))
    assert unsafe_globals(tmp_path / "train.pth.tar") == []


def test_feature_extractor_is_refused_with_the_right_reason(tmp_path):
    """resnet18 with fc = Identity outputs 512 features, no classes: refused, naming what is missing."""
    model = _model("resnet18", 10, 3)
    model.fc = nn.Identity()
    torch.save(model.eval(), tmp_path / "features.pt")
    with pytest.raises(UnsupportedModelError, match="without a Linear classifier; not an image classifier"):
        load_model(tmp_path / "features.pt", input_size=32)


def test_state_dict_of_a_classifier_without_bias_loads_and_round_trips(tmp_path):
    """fc = Linear(..., bias=False) (some training recipes): the state_dict has no fc.bias. It loads as the
    architecture with a bias-less fc (not as 'pruned'), and a fold/prune checkpoint of it reloads."""
    model = _model("resnet18", 10, 3)
    model.fc = nn.Linear(512, 10, bias=False).eval()
    torch.save(model.state_dict(), tmp_path / "nobias.pt")
    loaded = load_model(tmp_path / "nobias.pt", input_size=32)
    assert (loaded.arch, loaded.num_classes, loaded.source_format) == ("resnet18", 10, "state_dict")
    assert loaded.module.fc.bias is None and not loaded.pruned
    torch.testing.assert_close(_logits(loaded.module, (2, 3, 32, 32)), _logits(model, (2, 3, 32, 32)))
    out = save_checkpoint(loaded.module, tmp_path / "nobias.safetensors",
                          CheckpointHeader(arch="resnet18", num_classes=10, in_channels=3,
                                           preprocess=get_preset("cifar")))
    again = load_model(out)
    assert again.module.fc.bias is None and not again.pruned
    torch.testing.assert_close(_logits(again.module, (2, 3, 32, 32)), _logits(model, (2, 3, 32, 32)))
