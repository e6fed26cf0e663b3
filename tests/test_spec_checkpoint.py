"""Preprocessing presets and the pickle-free checkpoint format (incl. pruned widths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rescompress.checkpoint import CheckpointHeader, load_checkpoint, read_header, save_checkpoint
from rescompress.errors import RescompressError
from rescompress.fileio import atomic_path, ensure_not_input
from rescompress.models import build_model
from rescompress.profile import count_macs, count_params
from rescompress.spec import Preprocess, get_preset


def test_preset_overrides_and_round_trip():
    pre = get_preset("imagenet").with_overrides(size=112)
    assert pre.size == (112, 112) and pre.resize == 128
    assert Preprocess.from_dict(pre.to_dict()) == pre
    gray = get_preset("imagenet").with_overrides(channels=1)
    assert gray.mean == (pytest.approx(sum((0.485, 0.456, 0.406)) / 3),)
    with pytest.raises(RescompressError, match="needs 1 or 3 values"):
        get_preset("cifar").with_overrides(mean=(0.1, 0.2))
    with pytest.raises(RescompressError, match="unknown preprocessing preset"):
        get_preset("coco")
    with pytest.raises(RescompressError, match="channels must be 1 or 3"):
        get_preset("cifar").with_overrides(channels=4)


def test_reference_resnets_shapes_and_counts():
    for arch, blocks in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
        m = build_model(arch, num_classes=7, in_channels=1).eval()
        assert len(m.layer1) == blocks
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    # He et al. report 0.27 M parameters for ResNet-20 (option A); option B adds the 1x1 downsample convs.
    assert count_params(build_model("resnet20", 10, 3)) == 272474
    assert count_macs(build_model("resnet50"), (1, 3, 224, 224)) == 4_089_184_256


def test_checkpoint_round_trip_with_pruned_widths(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    # Prune layer1.0's inner width 16 -> 9 by hand: conv1 out, bn1, conv2 in.
    keep = torch.arange(9)
    blk = model.layer1[0]
    conv1 = nn.Conv2d(16, 9, 3, padding=1, bias=False)
    conv1.weight.data = blk.conv1.weight.data[keep].clone()
    bn1 = nn.BatchNorm2d(9)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn1, name).data = getattr(blk.bn1, name).data[keep].clone()
    conv2 = nn.Conv2d(9, 16, 3, padding=1, bias=False)
    conv2.weight.data = blk.conv2.weight.data[:, keep].clone()
    blk.conv1, blk.bn1, blk.conv2 = conv1, bn1, conv2
    model.eval()  # the new modules start in training mode
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / "pruned.safetensors"
    pre = get_preset("fashion-mnist")
    save_checkpoint(model, path, CheckpointHeader("resnet20", 10, 1, pre, pruned=True))
    header = read_header(path)
    assert header is not None and header.pruned and header.preprocess == pre
    loaded, _ = load_checkpoint(path)
    assert loaded.layer1[0].conv1.out_channels == 9 and loaded.layer1[0].conv2.in_channels == 9
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert b"pickle" not in path.read_bytes()[:64]
    # The same model and header give the same bytes (safetensors writes its header in hash-map order).
    import json
    import struct

    for i in range(3):
        again = CheckpointHeader("resnet20", 10, 1, pre, pruned=True)
        save_checkpoint(model, tmp_path / f"again{i}.safetensors", again)
        assert (tmp_path / f"again{i}.safetensors").read_bytes() == path.read_bytes()
    raw = path.read_bytes()
    head = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert list(head) == sorted(head) and list(head["__metadata__"]) == sorted(head["__metadata__"])


def test_read_header_of_non_checkpoint_is_none(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, p)
    assert read_header(p) is None


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"ok")
    assert (tmp_path / "new.bin").stat().st_mode & 0o644 == 0o644  # readable like any other output
    with pytest.raises(RescompressError, match="same file as input"):
        ensure_not_input(target, [tmp_path / "a", target])


def _randomized(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _same(a: nn.Module, b: nn.Module, channels: int = 3) -> bool:
    x = torch.randn(2, channels, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_custom_head_and_unnamed_structure_round_trip(tmp_path):
    """A transfer-learning MLP head, a bias-free fc and ResNet depths no builder is named after are
    described in the header and rebuilt exactly."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    mlp = build_model("resnet18", 10)
    mlp.fc = nn.Sequential(nn.Linear(512, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Dropout(0.3), nn.Linear(96, 10))
    bare = build_model("resnet18", 10)
    bare.fc = nn.Linear(512, 10, bias=False)
    odd_basic = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=7)
    odd_bottleneck = ResNet(Bottleneck, [2, 1, 1, 1], num_classes=7)
    for i, (arch, model) in enumerate([("resnet18", mlp), ("resnet18", bare), ("resnet_basic_1-1-1-1_g1w64", odd_basic),
                                       ("resnet_bottleneck_2-1-1-1_g1w64", odd_bottleneck)]):
        model = _randomized(model)
        classes = model.fc[-1].out_features if isinstance(model.fc, nn.Sequential) else model.fc.out_features
        path = save_checkpoint(model, tmp_path / f"{i}.safetensors", CheckpointHeader(arch, classes, 3, None))
        loaded, header = load_checkpoint(path)
        assert _same(model, loaded), arch
        assert type(loaded.fc) is type(model.fc)
        assert (header.structure is None) == (arch == "resnet18")
        assert (header.head is None) == (arch != "resnet18")


def test_structure_a_header_cannot_describe_is_refused_before_writing(tmp_path):
    from rescompress.checkpoint import check_saveable
    from rescompress.errors import UnsupportedModelError

    pooled = build_model("resnet18", 10)
    pooled.avgpool = nn.AdaptiveMaxPool2d(1)  # not recorded anywhere: would reload as average pooling
    odd_head = build_model("resnet18", 10)
    odd_head.fc = nn.Sequential(nn.Linear(512, 10), nn.Hardtanh())
    header = CheckpointHeader("resnet18", 10, 3, None)
    for model, message in ((pooled, r"computes something else \(avgpool: AdaptiveMaxPool2d\(output_size=1\)\)"),
                           (odd_head, r"holds a Hardtanh \(fc.1\)")):
        with pytest.raises(UnsupportedModelError, match=message):
            check_saveable(_randomized(model), header)
        with pytest.raises(UnsupportedModelError, match=message):
            save_checkpoint(model, tmp_path / "m.safetensors", header)
        assert list(tmp_path.iterdir()) == []


def test_staged_outputs_commit_whole_sets_and_clean_up(tmp_path):
    from rescompress.fileio import StagedOutputs

    # "new/../out" names a folder whose path passes through one this run creates
    odd = tmp_path / "new" / ".." / "out"
    with StagedOutputs(odd) as staged:
        staged.path(odd / "a.txt").write_text("a")
        staged.commit()
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    # a target that is a folder refuses the commit before any file moves: the old set stays whole
    out = tmp_path / "o"
    out.mkdir()
    (out / "a").write_text("old a")
    (out / "b").mkdir()
    with pytest.raises(RescompressError, match="it is a folder"), StagedOutputs(out) as staged:
        staged.path(out / "a").write_text("new a")
        staged.path(out / "b").write_text("new b")
        staged.commit()
    assert (out / "a").read_text() == "old a" and sorted(p.name for p in out.iterdir()) == ["a", "b"]
    # an interrupted run removes the folders it created, and only those
    with pytest.raises(KeyboardInterrupt), StagedOutputs(tmp_path / "x" / "y") as staged:
        staged.path(tmp_path / "x" / "y" / "f").write_text("f")
        raise KeyboardInterrupt
    assert not (tmp_path / "x").exists()


def test_an_interrupt_after_the_commit_says_the_outputs_landed(tmp_path, monkeypatch, capsys):
    import typer

    from rescompress import fileio
    from rescompress.cli.common import handle_errors
    from rescompress.fileio import StagedOutputs

    monkeypatch.setattr(fileio, "COMMITTED", [])

    @handle_errors
    def job(out):
        with StagedOutputs(out) as staged:
            staged.path(out / "f").write_text("x")
            if out.name == "late":
                staged.commit()
            raise KeyboardInterrupt

    with StagedOutputs(tmp_path / "outer") as outer, StagedOutputs(outer.folder) as inner:  # demo's nesting
        inner.path(outer.folder / "g").write_text("y")
        inner.commit()
    assert fileio.COMMITTED == []  # landed in the outer staging folder only, not in an output folder
    for name, landed in (("early", False), ("late", True)):
        with pytest.raises(typer.Exit) as exit_info:
            job(tmp_path / name)
        assert exit_info.value.exit_code == 130
        err = capsys.readouterr().err.strip()
        assert (tmp_path / name / "f").exists() == landed
        assert err == (f"Error: interrupted after writing the outputs to {tmp_path / name}" if landed
                       else "Error: interrupted")
