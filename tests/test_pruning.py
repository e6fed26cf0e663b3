"""Structured pruning: coupled groups stay consistent, targets and rounding hold, criteria find planted
channels, recovery does what it says, and pruned models save, reload, export and quantize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from rescompress.checkpoint import load_checkpoint
from rescompress.data import limit_indices, make_loader, open_dataset
from rescompress.errors import RescompressError
from rescompress.models import build_model
from rescompress.profile import count_macs
from rescompress.pruning import (
    FinetuneConfig,
    MacModel,
    PruneConfig,
    PruningGraphError,
    build_graph,
    channel_groups,
    make_importance,
    prune_model,
    recalibrate_bn,
    save_pruned,
)
from rescompress.pruning.finetune import augment_batch, distillation_loss, finetune
from rescompress.pruning.groups import prune_groups
from rescompress.pruning.schedule import linear_steps
from rescompress.pruning.targets import (
    GroupSpec,
    channels_to_remove,
    default_round_to,
    effective_round_to,
    fit_fraction,
    plan_keep,
    round_keep,
)
from rescompress.spec import PRESETS, Preprocess

FMNIST = PRESETS["fashion-mnist"]
TINY = FMNIST.with_overrides(size=16)  # recovery tests train: 16x16 keeps them fast on 2 cores
SMALL_RGB = Preprocess("small", (64, 64), 3, (0.5,), (0.25,))
CASES = {
    "resnet20": (FMNIST, 10, 1),
    "resnet18": (SMALL_RGB, 10, 3),
    "resnet50": (SMALL_RGB, 7, 3),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pruned() -> dict:
    """Each architecture pruned once to 50% of MACs, round-to 8 (shared by several tests: tracing is slow)."""
    torch.manual_seed(0)
    out = {}
    for arch, (pre, classes, channels) in CASES.items():
        model = build_model(arch, classes, channels).eval()
        _randomize_bn(model)
        result = prune_model(model, pre, PruneConfig(target_macs=0.5, round_to=8))
        out[arch] = (model, result, pre, classes, channels)
    return out


def _randomize_bn(model: nn.Module) -> None:
    # Fresh BNs are the identity; random statistics make equal outputs a real check, not a coincidence.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


def _block_widths_consistent(model: nn.Module, in_channels: int) -> None:
    """Every residual add sees equal widths: block output == downsample output or block input."""
    assert model.conv1.in_channels == in_channels
    width = model.bn1.num_features
    for m in model.modules():
        if isinstance(m, BasicBlock | Bottleneck):
            last = m.conv3 if isinstance(m, Bottleneck) else m.conv2
            last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2
            assert m.conv1.in_channels == width
            skip = m.downsample[0].out_channels if m.downsample is not None else width
            if m.downsample is not None:
                assert m.downsample[0].in_channels == width
                assert m.downsample[1].num_features == skip
            assert last.out_channels == last_bn.num_features == skip
            assert m.bn1.num_features == m.conv1.out_channels
            width = skip
    assert model.fc.in_features == width


# ------------------------------------------------------------------------------------ groups and targets


@pytest.mark.parametrize("arch", list(CASES))
def test_residual_groups_pruned_consistently(pruned, arch):
    model, result, pre, classes, channels = pruned[arch]
    small = result.model
    _block_widths_consistent(small, channels)
    assert small.fc.out_features == classes  # classifier outputs never pruned
    x = torch.randn(pre.input_shape(2))
    with torch.no_grad():
        assert small(x).shape == (2, classes)
    # The input model is untouched.
    assert count_macs(model, pre.input_shape(1)) == result.before.macs
    assert result.after.params < result.before.params


@pytest.mark.parametrize("arch", list(CASES))
def test_macs_target_reached_and_round_to_respected(pruned, arch):
    _, result, pre, _, _ = pruned[arch]
    kept = result.after.macs / result.before.macs
    assert 0.45 <= kept <= 0.5, kept  # never above the target; rounding costs at most a few points
    assert result.after.macs == count_macs(result.model, pre.input_shape(1))
    assert result.report.round_to == 8
    for g in result.report.groups:
        assert 1 <= g.width_after <= g.width_before
        assert g.round_step == effective_round_to(g.width_before, 8)
        assert g.width_after == g.width_before or g.width_after % g.round_step == 0, g
    widths = {n: m.out_channels for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d)}
    for g in result.report.groups:
        assert widths[g.root] == g.width_after


def test_mac_model_predicts_counted_macs():
    model = build_model("resnet18", 10, 3).eval()
    dg = build_graph(model, torch.randn(2, 3, 32, 32))
    groups = channel_groups(model, dg)
    mac_model = MacModel(model, groups, (1, 3, 32, 32))
    assert mac_model.total == count_macs(model, (1, 3, 32, 32))
    keep = {g.index: max(1, g.width * 3 // 8) for g in groups}
    predicted = mac_model.macs(keep)
    prune_groups(dg, groups, {g.index: list(range(g.width - keep[g.index])) for g in groups})
    assert predicted == count_macs(model, (1, 3, 32, 32))


def test_round_to_rules():
    assert effective_round_to(64, 16) == 16
    assert effective_round_to(32, 16) == 8
    assert effective_round_to(16, 16) == 4  # a 16-channel CIFAR layer can still be pruned in quarters
    assert effective_round_to(48, 16) == 8
    assert effective_round_to(3, 16) == 1
    assert effective_round_to(256, 1) == 1
    for width in (3, 16, 24, 64):
        for keep in (0.0, 0.4, 1.0, width / 2, width - 0.1, width + 5):
            k = round_keep(width, keep, effective_round_to(width, 16))
            assert 1 <= k <= width
    assert round_keep(64, 37.0, 16) == 32 and round_keep(64, 41.0, 16) == 48
    assert default_round_to({"avx512f": True, "avx2": True})[0] == 16
    assert default_round_to({"avx512f": False, "avx2": True})[0] == 8
    assert default_round_to({})[0] == 4


def test_global_ranking_respects_layer_cap():
    specs = [GroupSpec(0, 16, 1, 8), GroupSpec(1, 16, 1, 1)]
    scores = {0: torch.full((16,), 0.001) + torch.arange(16) * 1e-5, 1: torch.arange(1, 17, dtype=torch.float32)}
    keep = plan_keep(specs, 0.5, "global", scores)
    # Group 0's scores are tiny but normalized per group; the cap (min_keep 8) bounds what it loses.
    assert keep[0] >= 8
    assert sum(keep.values()) == 16
    assert plan_keep(specs, 0.5, "uniform") == {0: 8, 1: 8}
    assert channels_to_remove(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2) == [1, 3]


def test_schedule_is_linear():
    assert linear_steps(1.0, 0.4, 3) == pytest.approx([0.8, 0.6, 0.4])
    assert linear_steps(0.0, 0.5, 1) == [0.5]
    with pytest.raises(RescompressError):
        linear_steps(1.0, 0.5, 0)


def test_fit_fraction_solves_the_line():
    points = [(0.4, 0.45), (0.6, 0.62), (0.8, 0.83)]
    f = fit_fraction(points, 0.6)
    assert 0.55 < f < 0.6
    assert fit_fraction([(0.5, 0.7), (0.7, 0.5)], 0.6) == 0.7  # noise: largest fraction under the goal


@pytest.mark.parametrize("ranking", ["uniform", "global"])
def test_ratio_in_steps_ends_where_one_step_does(ranking):
    """--ratio R --steps K removes R of the original channels, like one step: rounding each step's widths
    to --round-to must not compound (it used to remove 75% for R = 0.5 in 3 steps, and nothing in 8)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    one = prune_model(model, FMNIST, PruneConfig(ratio=0.5, steps=1, ranking=ranking, round_to=16))
    assert one.report.steps[0].ratio == pytest.approx(0.5, abs=0.05)
    for steps in (3, 8):
        many = prune_model(model, FMNIST, PruneConfig(ratio=0.5, steps=steps, ranking=ranking, round_to=16))
        ratios = [s.ratio for s in many.report.steps]  # fraction of the original channels gone so far
        assert len(ratios) == steps and ratios == sorted(ratios)
        # global ranking re-scores between steps, so its groups may differ; the amount removed may not
        assert ratios[-1] == pytest.approx(0.5, abs=0.06), ratios
        assert 0.15 <= many.macs_kept <= 0.35
        if ranking == "uniform":  # same widths, group by group
            assert [c.width_after for c in many.report.groups] == [c.width_after for c in one.report.groups]
    small = prune_model(model, FMNIST, PruneConfig(ratio=0.3, steps=8, ranking=ranking, round_to=16))
    assert small.report.steps[-1].ratio == pytest.approx(0.3, abs=0.06) and small.macs_kept < 0.65


def test_iterative_steps_reach_target():
    model = build_model("resnet20", 10, 1).eval()
    result = prune_model(model, FMNIST, PruneConfig(target_macs=0.4, steps=2, round_to=4))
    assert len(result.report.steps) == 2
    first, second = result.report.steps
    assert first.macs_target == int(0.7 * result.before.macs)
    assert first.macs <= first.macs_target and second.macs <= second.macs_target
    assert second.macs < first.macs
    assert 0.35 <= result.macs_kept <= 0.4


def test_ratio_target_and_global_cap():
    model = build_model("resnet20", 10, 1).eval()
    result = prune_model(model, FMNIST, PruneConfig(ratio=0.25, round_to=1))
    for g in result.report.groups:
        assert g.width_after == g.width_before - round(g.width_before * 0.25)
    glob = prune_model(model, FMNIST, PruneConfig(target_macs=0.5, ranking="global", max_layer_ratio=0.5,
                                                  round_to=1, criterion="l2"))
    assert glob.macs_kept <= 0.5
    for g in glob.report.groups:
        assert g.width_after >= math.ceil(g.width_before * 0.5)


# ------------------------------------------------------------------------------------ criteria


def _plant_dead_channels(model: nn.Module, dead: list[int]) -> None:
    """Make channels ``dead`` of layer2.1's inner conv contribute nothing (weights, BN, consumer slices)."""
    block = model.layer2[1]
    with torch.no_grad():
        block.conv1.weight[dead] = 0
        block.bn1.weight[dead] = 0
        block.bn1.bias[dead] = 0
        block.conv2.weight[:, dead] = 0


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "taylor"])
def test_criteria_find_planted_channels(criterion, calib_npz):
    model = build_model("resnet20", 10, 1).eval()
    _randomize_bn(model)
    dead = [3, 7, 11, 20]
    _plant_dead_channels(model, dead)
    dg = build_graph(model, torch.randn(2, 1, 28, 28))
    group = next(g for g in channel_groups(model, dg) if g.root_name == "layer2.1.conv1")
    imp = make_importance(criterion)
    if criterion == "taylor":
        data = open_dataset(calib_npz, FMNIST)
        imp.accumulate(model, make_loader(data, batch_size=32, limit=64))
    scores = imp(group)
    assert scores.shape == (32,)
    assert channels_to_remove(scores, 32 - len(dead)) == dead
    random_pick = channels_to_remove(make_importance("random", seed=0)(group), 32 - len(dead))
    assert random_pick != dead


def test_removing_dead_channels_keeps_outputs():
    model = build_model("resnet20", 10, 1).eval()
    _randomize_bn(model)
    _plant_dead_channels(model, [3, 7, 11, 20])
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    dg = build_graph(model, x[:2])
    groups = channel_groups(model, dg)
    target = next(g for g in groups if g.root_name == "layer2.1.conv1")
    remove = channels_to_remove(make_importance("l1")(target), 28)
    prune_groups(dg, groups, {target.index: remove})
    assert model.layer2[1].conv1.out_channels == 28 and model.layer2[1].conv2.in_channels == 28
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ recovery


def test_bn_recalibration_matches_batch_statistics(calib_npz):
    model = build_model("resnet20", 10, 1).eval()
    data = open_dataset(calib_npz, FMNIST)
    seen = recalibrate_bn(model, make_loader(data, batch_size=50, limit=200), 150)
    assert seen == 150
    x = torch.stack([data[i][0] for i in limit_indices(len(data), 200)[:150]])
    with torch.no_grad():
        act = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, act.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    # Each batch's (unbiased) variance, averaged over images: the standard BN re-estimation estimate.
    batch_var = torch.stack([act[i : i + 50].var(dim=(0, 2, 3), unbiased=True) for i in (0, 50, 100)]).mean(0)
    torch.testing.assert_close(model.bn1.running_var, batch_var, rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1 and not model.training


def test_bn_recalibration_weighs_batches_by_images_and_skips_single_images():
    """A ragged last batch weighed as much as a full one (one image as much as 64: var off by 20%); a last
    batch of one image crashed where a layer's output is 1x1 (torchvision resnet at 32x32)."""
    torch.manual_seed(0)
    x = torch.randn(65, 1, 28, 28)
    ragged, whole = build_model("resnet20", 10, 1).eval(), build_model("resnet20", 10, 1).eval()
    whole.load_state_dict(ragged.state_dict())
    assert recalibrate_bn(ragged, [(x[:40], None), (x[40:], None)], 65) == 65
    assert recalibrate_bn(whole, [(x, None)], 65) == 65
    # The first BatchNorm's input does not depend on the batching (later ones see batch-normalized inputs).
    torch.testing.assert_close(ragged.bn1.running_mean, whole.bn1.running_mean, rtol=1e-4, atol=1e-6)
    import torchvision

    r18 = torchvision.models.resnet18(num_classes=5).eval()  # layer4 output is 1x1 at 32x32
    xs = torch.randn(65, 3, 32, 32)
    assert recalibrate_bn(r18, [(xs[:64], None), (xs[64:], None)], 65) == 64


def test_distillation_loss():
    t = torch.randn(8, 10)
    assert distillation_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10)
    assert distillation_loss(s, t, 4.0).item() > 0.01
    # per image (the learning-rate trials' paired comparison): 8 values whose mean is the batch mean
    each = distillation_loss(s, t, 4.0, per_image=True)
    assert each.shape == (8,) and bool((each >= 0).all())
    assert each.mean().item() == pytest.approx(distillation_loss(s, t, 4.0).item(), rel=1e-5)


def test_one_output_classifier_trains_and_scores_with_binary_losses(calib_npz, tmp_path):
    """A single logit z is a sigmoid classifier: cross entropy on [0, z] is the binary cross entropy, so the
    Taylor scores and fine-tuning get gradients (cross entropy over one column is 0 everywhere)."""
    from rescompress.pruning.finetune import as_two_class

    z = torch.tensor([[2.0], [-1.0]])
    y = torch.tensor([1, 1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float())
    assert torch.nn.functional.cross_entropy(as_two_class(z), y).item() == pytest.approx(bce.item(), rel=1e-6)
    assert as_two_class(z).argmax(1).tolist() == [1, 0]
    assert distillation_loss(as_two_class(z), as_two_class(-z), 1.0).item() > 0.1
    z = np.load(calib_npz)
    np.savez(tmp_path / "bin.npz", x=z["x"][:64], y=(z["y"][:64] >= 5).astype(np.int64))  # 2 classes
    data = open_dataset(tmp_path / "bin.npz", TINY)
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 1).eval()
    taylor = make_importance("taylor")
    taylor.accumulate(model, make_loader(data, batch_size=32))
    assert float(model.conv1.weight.grad.abs().sum()) > 0.0
    report = finetune(model, make_loader(data, batch_size=16, shuffle=True), FinetuneConfig(epochs=2, lr=0.05))
    assert report.first_loss > 0.1 and report.last_loss < report.first_loss


def test_finetune_with_distillation_lowers_loss(calib_npz):
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, 1).eval()
    student = prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4)).model
    data = open_dataset(calib_npz, TINY)
    loader = make_loader(data, batch_size=16, limit=64, shuffle=True)
    report = finetune(student, loader, FinetuneConfig(epochs=3, lr=0.05), teacher=teacher)
    assert report.batches == 12 and report.images == 192 and report.distill
    assert report.last_loss < report.first_loss
    assert not student.training


def _augment_one_by_one(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Reference: the same draws as augment_batch, applied image by image with slicing."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def test_augment_batch_matches_per_image_crops_and_flips():
    x = torch.randn(32, 3, 20, 12)
    got = augment_batch(x, torch.Generator().manual_seed(5), pad=3)
    want = _augment_one_by_one(x, 3, torch.Generator().manual_seed(5))
    assert got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got, want)
    # default pad is 1/8 of the shorter side; shifts and flips change some images but keep values in range
    got = augment_batch(x, torch.Generator().manual_seed(6))
    assert torch.equal(got, _augment_one_by_one(x, 2, torch.Generator().manual_seed(6)))
    assert not torch.equal(got, x)
    assert got.min() >= x.min() and got.max() <= x.max()


def test_finetune_with_augmentation_is_seeded(calib_npz):
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, 1).eval()
    data = open_dataset(calib_npz, TINY)
    losses = []
    for _ in range(2):
        student = prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4)).model
        torch.manual_seed(1)
        loader = make_loader(data, batch_size=16, limit=32, shuffle=True, seed=3)
        rep = finetune(student, loader, FinetuneConfig(epochs=1, lr=0.05, augment=True, seed=9), teacher=teacher)
        losses.append((rep.first_loss, rep.last_loss))
    assert rep.batches == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.needs_cuda
def test_prune_and_finetune_on_cuda(calib_npz):
    model = build_model("resnet20", 10, 1).eval()
    data = open_dataset(calib_npz, TINY)
    from torch.utils.data import Subset

    small = Subset(data, range(64))
    small.info = data.info
    cfg = PruneConfig(target_macs=0.6, criterion="taylor", bn_recalib=32, taylor_images=32, device="cuda",
                      finetune=FinetuneConfig(epochs=1, lr=0.02, augment=True), batch_size=16)
    result = prune_model(model, TINY, cfg, data=small)
    step = result.report.steps[0]
    assert step.finetune is not None and step.finetune.device.startswith("cuda") and step.finetune.batches == 4
    assert next(result.model.parameters()).device.type == "cpu"
    assert 0.5 <= result.macs_kept <= 0.62


def test_prune_with_data_recalibrates_and_finetunes(calib_npz, eval_npz):
    model = build_model("resnet20", 10, 1).eval()
    data = open_dataset(calib_npz, TINY)
    evald = open_dataset(eval_npz, TINY)
    from torch.utils.data import Subset

    small = Subset(data, range(64))
    small.info = data.info  # labeled source
    cfg = PruneConfig(target_macs=0.6, criterion="taylor", bn_recalib=48, taylor_images=32,
                      finetune=FinetuneConfig(epochs=1, lr=0.02), batch_size=16)
    result = prune_model(model, TINY, cfg, data=small, eval_data=evald, eval_limit=100)
    step = result.report.steps[0]
    assert step.bn_recalib_images == 48
    assert step.finetune is not None and step.finetune.batches == 4
    assert 0.0 <= result.after.top1 <= 100.0 and 0.0 <= result.before.top1 <= 100.0
    assert result.report.notes == ()


def test_unlabeled_finetune_data_falls_back_to_bn(tmp_path, calib_npz):
    with np.load(calib_npz) as z:
        np.savez(tmp_path / "unlabeled.npz", x=z["x"][:64])
    data = open_dataset(tmp_path / "unlabeled.npz", TINY)
    model = build_model("resnet20", 10, 1).eval()
    cfg = PruneConfig(ratio=0.25, bn_recalib=64, finetune=FinetuneConfig(epochs=1), batch_size=32)
    result = prune_model(model, TINY, cfg, data=data)
    assert result.report.steps[0].finetune is None
    assert result.report.steps[0].bn_recalib_images == 64
    assert any("no labels" in n for n in result.report.notes)


# ------------------------------------------------------------------------------------ save / load / export


@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_save_load_gives_identical_outputs(pruned, arch, tmp_path):
    _, result, pre, classes, channels = pruned[arch]
    path = save_pruned(result.model, tmp_path / f"{arch}.pruned.safetensors", arch=arch, num_classes=classes,
                       in_channels=channels, preprocess=pre, summary={"macs_kept": result.macs_kept})
    reloaded, header = load_checkpoint(path)
    assert header.pruned and header.extra["pruning"]["macs_kept"] == pytest.approx(result.macs_kept)
    x = torch.randn(pre.input_shape(2))
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    from rescompress.loading import load_model

    loaded = load_model(path)
    assert loaded.arch == arch and loaded.num_classes == classes and loaded.in_channels == channels
    assert loaded.macs == result.after.macs
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.model(x))


def test_pruned_model_exports_to_onnx_and_quantizes(pruned, tmp_path, calib_npz):
    import onnxruntime as ort

    from rescompress.export import export_onnx

    _, result, pre, classes, _ = pruned["resnet20"]
    path = save_pruned(result.model, tmp_path / "r20.safetensors", arch="resnet20", num_classes=classes,
                       in_channels=1, preprocess=pre)
    exported = export_onnx(result.model, pre, tmp_path / "r20.onnx", arch="resnet20", num_classes=classes)
    assert exported.parity is None or exported.parity.passed
    sess = ort.InferenceSession(str(tmp_path / "r20.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(pre.input_shape(3))
    with torch.no_grad():
        ref = result.model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-4)
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    q = quantize_model(path, calib_npz, tmp_path / "q", config=QuantizeConfig(num_images=64, method="max"))
    assert q is not None
    assert any(p.suffix == ".onnx" for p in (tmp_path / "q").iterdir())


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_are_one_line_errors():
    model = build_model("resnet20", 10, 1).eval()
    bad = [
        PruneConfig(ratio=1.5),
        PruneConfig(ratio=0.0),
        PruneConfig(target_macs=0.5, ratio=0.3),
        PruneConfig(),
        PruneConfig(target_macs=1.2),
        PruneConfig(ratio=0.9, max_layer_ratio=0.8),
        PruneConfig(ratio=0.3, criterion="hessian"),
        PruneConfig(ratio=0.3, steps=0),
        PruneConfig(ratio=0.3, round_to=0),
        PruneConfig(ratio=0.3, criterion="taylor"),  # needs data
        PruneConfig(ratio=0.3, finetune=FinetuneConfig(epochs=1)),  # needs data
    ]
    for cfg in bad:
        with pytest.raises(RescompressError) as info:
            prune_model(model, FMNIST, cfg)
        assert "\n" not in str(info.value) and str(info.value)


def test_unreachable_target_is_refused():
    model = build_model("resnet20", 10, 1).eval()
    with pytest.raises(RescompressError, match="max-layer-ratio"):
        prune_model(model, FMNIST, PruneConfig(target_macs=0.05, max_layer_ratio=0.5))


def test_model_without_conv_groups_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(PruningGraphError, match="no prunable channel groups"):
        prune_model(model, FMNIST, PruneConfig(ratio=0.3))


def test_notes_say_when_the_ask_is_not_what_was_done():
    """A global ratio beyond the per-layer cap, and grouped convolutions that are left alone, are said."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    capped = prune_model(model, FMNIST, PruneConfig(ratio=0.9, ranking="global", round_to=1))
    assert capped.report.steps[-1].ratio < 0.85
    assert any("not 90%" in n and "--max-layer-ratio" in n for n in capped.report.notes)
    assert not any("--round-to" in n for n in capped.report.notes)  # at --round-to 1 it cannot help
    # Over-shoot: at --round-to 16, 16-wide layers move in steps of 4 (13.6 channels -> 12): 25% went, not 15%.
    over = prune_model(model, FMNIST, PruneConfig(ratio=0.15, round_to=16))
    assert over.report.steps[-1].ratio > 0.2
    assert any("not 15%" in n and "nearest multiples of --round-to" in n for n in over.report.notes)
    # Two steps whose rounded widths are the same: the second removes nothing, and that is said.
    idle = prune_model(model, FMNIST, PruneConfig(ratio=0.3, steps=2, round_to=16))
    assert idle.report.steps[0].macs == idle.report.steps[1].macs
    assert any(n.startswith("step 2 of 2 removed no channel") for n in idle.report.notes)
    # Nothing removed at all (10% of a 16-wide layer rounds back to 16): every idle step, the first included.
    none = prune_model(model, FMNIST, PruneConfig(ratio=0.1, steps=3, round_to=16))
    assert none.report.steps[-1].ratio == 0
    assert any(n.startswith("steps 1, 2, 3 of 3 removed no channel") for n in none.report.notes)
    assert any("removed 0% of the channels, not 10%" in n and "--max-layer-ratio" not in n for n in none.report.notes)
    plain = prune_model(model, FMNIST, PruneConfig(ratio=0.3, round_to=1))
    assert not any("not 30%" in n or "grouped" in n for n in plain.report.notes)
    from torchvision.models import resnext50_32x4d

    rx = resnext50_32x4d(num_classes=5).eval()
    res = prune_model(rx, SMALL_RGB.with_overrides(size=32), PruneConfig(ratio=0.3))
    assert any("grouped convolution" in n and "layer1.0.conv2" in n for n in res.report.notes)


@pytest.mark.parametrize(("n", "batch", "sizes"), [
    (120, 64, [64, 56]),  # a tiny fine-tuning set keeps its second, ragged batch
    (129, 64, [64, 64]),  # a remainder of one image (breaks BatchNorm) is dropped
    (70, 64, [64]),  # six images, under a quarter batch: dropped
    (40, 64, [40]),  # smaller than one batch: nothing would be left, so it is kept
])
def test_training_loader_drops_only_a_small_ragged_batch(n, batch, sizes):
    from torch.utils.data import TensorDataset

    from rescompress.pruning.pruner import _loader

    data = TensorDataset(torch.zeros(n, 1, 4, 4), torch.zeros(n, dtype=torch.long))
    loader = _loader(data, batch, shuffle=True, seed=0, drop_last=True)
    assert sorted((len(x) for x, _ in loader), reverse=True) == sizes


# ------------------------------------------------------------------------- learning rate, averaging, residual


def _lr_setup(calib_npz):
    from torch.utils.data import Subset

    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, 1).eval()
    student = prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4)).model
    data = open_dataset(calib_npz, TINY)
    held = make_loader(Subset(data, range(64)), batch_size=32)
    fit = Subset(data, range(64, 128))
    return teacher, student, data, held, lambda: make_loader(fit, batch_size=16, shuffle=True, seed=1)


def test_choose_lr_judges_copies_on_held_out_images_and_keeps_the_model(calib_npz):
    from rescompress.pruning import choose_lr
    from rescompress.pruning.finetune import held_out_loss

    teacher, student, _, held, fit = _lr_setup(calib_npz)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = FinetuneConfig(lr=None, alpha=0.5)
    choice = choose_lr(student, fit, held, cfg, total_batches=4, teacher=teacher, candidates=(1e-4, 0.05, 1e5))
    assert set(choice.held_out_loss) == {1e-4, 0.05, 1e5}
    assert choice.trial_batches == 4 and choice.held_out_images == 64  # at least 20 batches, at most the run's
    finite = {lr: v for lr, v in choice.held_out_loss.items() if math.isfinite(v)}
    assert choice.lowest == min(finite, key=finite.get) and choice.lr != 1e5  # a rate of 1e5 diverges or is worst
    # the chosen rate is the lowest-loss one or the next larger one, within one standard error of it
    order = sorted(choice.held_out_loss)
    assert choice.lr in (choice.lowest, *order[order.index(choice.lowest) + 1:][:1])
    assert choice.standard_error[choice.lowest] == 0.0
    assert finite[choice.lr] - finite[choice.lowest] <= choice.standard_error[choice.lr]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # trials train copies
    # the recorded loss is what a fresh run at the chosen rate reaches (same batches, same seed)
    import copy

    again = copy.deepcopy(student)
    finetune(again, fit(), FinetuneConfig(lr=choice.lr, alpha=0.5, max_batches=4), teacher=teacher)
    loss, images = held_out_loss(again, held, cfg, teacher, torch.device("cpu"))
    assert images == 64 and loss == pytest.approx(choice.held_out_loss[choice.lr], rel=1e-4)
    # an iterable that is read only once would leave later candidates with nothing to judge: refused
    with pytest.raises(RescompressError, match="no batch"):
        held_out_loss(again, iter(()), cfg, teacher, torch.device("cpu"))
    # a diverged candidate is written as null, not as a JSON-breaking Infinity
    from rescompress.pruning.finetune import LrChoice

    assert LrChoice(0.01, {0.01: 0.5, 1.0: math.inf}, 4, 64).to_dict()["held_out_loss"] == {"0.01": 0.5, "1.0": None}


def test_choose_rate_takes_the_next_larger_rate_within_one_standard_error():
    """The per-image losses of each candidate on the same held-out images: the next larger rate, when its mean
    exceeds the lowest by less than the standard error of the paired difference, is chosen; one beyond it is
    not, and the rule moves one candidate at most."""
    from rescompress.pruning.finetune import choose_rate

    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, generator=g, dtype=torch.float64)
    noise = torch.randn(400, generator=g, dtype=torch.float64)
    # paired difference: mean 0.004, standard deviation ~0.1 -> standard error ~0.005 (within)
    within = base + 0.004 + 0.1 * (noise - noise.mean()) / noise.std()
    # mean 0.02 with the same spread: four standard errors worse (ruled out)
    worse = base + 0.02 + 0.1 * (noise - noise.mean()) / noise.std()
    chosen, lowest, se = choose_rate({0.01: base + 0.05, 0.03: base, 0.06: within, 0.1: worse})
    assert lowest == 0.03 and chosen == 0.06
    assert se[0.03] == 0.0 and se[0.06] == pytest.approx(0.1 / math.sqrt(400), rel=1e-6)
    assert se[0.01] < 1e-12  # a constant shift has no spread: 0.05 worse is ruled out
    # without a within-noise larger rate the lowest stays; a diverged candidate (None, or a non-finite loss)
    # never wins, even when it is the largest
    inf = base.clone()
    inf[3] = math.inf
    assert choose_rate({0.01: base + 0.05, 0.03: base, 0.06: worse, 0.1: None, 0.3: inf})[0] == 0.03
    # equal losses go to the larger rate
    assert choose_rate({0.01: base, 0.03: base.clone()})[0] == 0.03
    # one step at most: with 0.03 and 0.06 both within noise of 0.01, 0.03 is chosen
    assert choose_rate({0.01: base, 0.03: within, 0.06: within.clone()})[:2] == (0.03, 0.01)
    # a diverged neighbour keeps the lowest, even with a larger rate within noise beyond it
    assert choose_rate({0.01: base, 0.03: None, 0.06: within})[0] == 0.01
    with pytest.raises(RescompressError, match="diverged at every"):
        choose_rate({0.01: None, 0.03: inf})


def test_prune_chooses_the_learning_rate_unless_given(calib_npz):
    from torch.utils.data import Subset

    from rescompress.errors import UsageError
    from rescompress.pruning.finetune import LR_CANDIDATES

    teacher, _, data, _, _ = _lr_setup(calib_npz)
    small = Subset(data, range(160))
    small.info = data.info
    auto = prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4, bn_recalib=32, batch_size=16,
                                                  finetune=FinetuneConfig(epochs=1)), data=small)
    ft = auto.report.steps[0].finetune
    assert ft.lr_choice is not None and ft.lr == ft.lr_choice["lr"] and ft.lr in LR_CANDIDATES
    # 16 of 160 images held out; each trial runs the run's 10 batches (at least 20, at most the run's), passing
    # over its 144 images again rather than stopping after 9
    assert ft.lr_choice["held_out_images"] == 16 and ft.lr_choice["trial_batches"] == 10
    assert ft.batches == 10  # the run itself trains on every image
    steps = prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4, bn_recalib=32, batch_size=16, steps=2,
                                                   finetune=FinetuneConfig(epochs=2)), data=small).report.steps
    assert steps[0].finetune.lr_choice is not None and steps[1].finetune.lr_choice is None  # chosen once,
    assert steps[1].finetune.lr == steps[0].finetune.lr  # then kept
    fixed = prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4, bn_recalib=32, batch_size=16,
                                                   finetune=FinetuneConfig(epochs=1, lr=0.02)), data=small)
    assert fixed.report.steps[0].finetune.lr_choice is None and fixed.report.steps[0].finetune.lr == 0.02
    for n, batch in ((15, 16), (40, 64)):  # no held-out tenth of 2 images; no batch left to train the trials
        tiny = Subset(data, range(n))
        tiny.info = data.info
        with pytest.raises(UsageError, match=f"too few for --batch-size {batch}"):
            prune_model(teacher, TINY, PruneConfig(ratio=0.25, round_to=4, bn_recalib=0, batch_size=batch,
                                                   finetune=FinetuneConfig(epochs=1)), data=tiny)
    with pytest.raises(UsageError, match="--lr"):
        PruneConfig(ratio=0.25, finetune=FinetuneConfig(lr=-1.0)).validate()


class _IndexImages(torch.utils.data.Dataset):
    """Image ``i`` is filled with the value ``i``, so a batch tells which items it came from."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1, 4, 4), float(i)), i % 10


def test_learning_rate_trials_never_train_on_the_held_out_images(monkeypatch):
    from rescompress.pruning import pruner

    seen = {}

    def capture(work, everything, ft, **kw):
        seen.update(kw, everything=everything)

    monkeypatch.setattr(pruner, "finetune_auto", capture)
    data = _IndexImages(3000)
    pruner._finetune_step(nn.Identity(), data, PruneConfig(ratio=0.25, batch_size=32), FinetuneConfig(epochs=1),
                          teacher=nn.Identity(), device=torch.device("cpu"), progress=None, k=1)

    def items(loader) -> list[int]:
        return [int(v) for x, _ in loader for v in x[:, 0, 0, 0]]

    held, trial, run = items(seen["held"]), items(seen["trial_loader"]()), items(seen["everything"]())
    assert len(held) == len(set(held)) == 300  # a tenth, under the 512 cap
    assert not set(held) & set(trial)
    assert len(set(held) | set(trial)) >= 3000 - 32  # the rest (less a ragged last batch) trains the trials
    assert set(run) >= set(held)  # the run itself trains on the held-out images too


def test_weight_average_follows_the_ramped_decay():
    from rescompress.pruning.finetune import _WeightAverage

    model = nn.BatchNorm2d(2)
    avg = _WeightAverage(model, decay=0.9)
    want = model.weight.detach().clone()
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.running_mean.add_(2.0)
        avg.update()
        d = min(0.9, (1 + step) / (10 + step))
        want = d * want + (1 - d) * model.weight.detach()
    avg.copy_to_model()
    assert torch.allclose(model.weight, want)
    assert int(model.num_batches_tracked) == 0  # integer buffers are left alone
    assert 0.0 < float(model.running_mean[0]) < 10.0  # averaged, not the last value


def test_residual_scale_zero_keeps_residual_streams_whole():
    model = build_model("resnet20", 10, 1).eval()
    res = prune_model(model, FMNIST, PruneConfig(target_macs=0.4, bn_recalib=0, residual_scale=0.0, round_to=16))
    widths = {g.root: (g.width_before, g.width_after) for g in res.report.groups}
    for root in ("conv1", "layer2.0.downsample.0", "layer3.0.downsample.0"):  # written by several convs
        assert widths[root][0] == widths[root][1]
    inner = [after / before for root, (before, after) in widths.items() if root.endswith(".conv1") and root != "conv1"]
    assert max(inner) < 1.0 and res.macs_kept <= 0.4
    from rescompress.errors import UsageError

    with pytest.raises(UsageError, match="residual_scale"):
        PruneConfig(target_macs=0.4, residual_scale=1.5).validate()
