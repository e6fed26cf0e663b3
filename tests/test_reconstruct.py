"""Least-squares layer reconstruction after pruning: exact where the pruned channels are redundant, a large
accuracy gain on the bundled model, index bookkeeping that survives several pruning steps, CUDA = CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rescompress.checkpoint import load_checkpoint
from rescompress.data import open_dataset
from rescompress.errors import UsageError
from rescompress.pruning import PruneConfig, prune_model, top1_accuracy
from rescompress.pruning.reconstruct import reconstruct_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _redundant_pair() -> tuple[nn.Module, nn.Module, dict[str, list[int]]]:
    """A teacher whose first conv's channel 3 is channel 0 + channel 1, and the student without channel 3."""
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, bias=True))
    # A ReLU would break linearity between channels unless the redundant channel is a positive combination of
    # inputs that are themselves non-negative: make the first conv's inputs and weights non-negative.
    w = torch.rand(4, 3, 1, 1, generator=g)
    w[3] = w[0] + w[1]
    teacher[0].weight.data = w
    teacher[2].weight.data = torch.randn(5, 4, 3, 3, generator=g)
    teacher[2].bias.data = torch.randn(5, generator=g)
    student = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1, bias=True))
    student[0].weight.data = w[:3].clone()
    student[2].weight.data = teacher[2].weight.data[:, :3].clone()
    student[2].bias.data = teacher[2].bias.data.clone()
    return teacher.eval(), student.eval(), {"0": [0, 1, 2]}


def test_reconstruction_is_exact_when_the_removed_channel_is_redundant():
    teacher, student, kept = _redundant_pair()
    x = [torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    probe = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    sliced_error = (student(probe) - teacher(probe)).abs().max().item()
    report = reconstruct_layers(teacher, student, kept, x, ridges=(1e-9,))
    fitted_error = (student(probe) - teacher(probe)).abs().max().item()
    assert sliced_error > 0.5  # the plain slice loses channel 3's contribution
    assert fitted_error < 2e-3  # the refit folds it into channels 0 and 1, on images it never saw
    assert report.layers == 1 and report.images == 24  # the first conv reads the image: nothing to refit
    assert report.error_before["2"] > 0.1 and report.error_after["2"] < 1e-3
    # Channel 3 = 0 + 1, so the refit weights of channels 0 and 1 gain channel 3's weights.
    w_t = teacher[2].weight.data
    assert torch.allclose(student[2].weight.data[:, 0], w_t[:, 0] + w_t[:, 3], atol=2e-2)
    assert torch.allclose(student[2].weight.data[:, 2], w_t[:, 2], atol=2e-2)


@pytest.fixture(scope="module")
def reference(reference_checkpoint, calib_npz, eval_npz):
    model, header = load_checkpoint(reference_checkpoint)
    pre = header.preprocess
    return model.eval(), pre, open_dataset(calib_npz, pre), open_dataset(eval_npz, pre)


@pytest.mark.parametrize("steps", [1, 2])
def test_reconstruction_recovers_most_of_the_accuracy_pruning_lost(reference, steps):
    model, pre, calib, evald = reference
    base = PruneConfig(target_macs=0.5, criterion="l2", bn_recalib=0, steps=steps, device="cpu")
    plain = prune_model(model, pre, base)
    rebuilt = prune_model(model, pre, PruneConfig(**{**base.__dict__, "reconstruct": 256}), data=calib)
    # Same channels removed: the reconstruction changes weights, never widths.
    assert [g.width_after for g in rebuilt.report.groups] == [g.width_after for g in plain.report.groups]
    top_plain = top1_accuracy(plain.model, evald, limit=600)
    top_rebuilt = top1_accuracy(rebuilt.model, evald, limit=600)
    top_base = top1_accuracy(model, evald, limit=600)
    # Measured: 93.0% unpruned, ~26% pruned (l2, half the MACs, no BN re-estimation), ~92% reconstructed.
    assert top_plain < 0.5
    assert top_rebuilt > top_base - 0.04
    rep = rebuilt.report.steps[-1].reconstruct
    assert rep is not None and rep.images == 256 and rep.layers >= 19  # every conv after the stem, and the fc
    assert all(rep.error_after[n] <= rep.error_before[n] for n in rep.error_after)  # the slice is a candidate
    mean_before = sum(rep.error_before.values()) / len(rep.error_before)
    assert sum(rep.error_after.values()) / len(rep.error_after) < 0.7 * mean_before  # measured: 0.41 -> 0.23
    assert rebuilt.report.steps[0].reconstruct is not None
    if steps == 2:
        # Step 2 targets the *original* channels through two removals: wrong bookkeeping would refit layers
        # to other channels' outputs, and the error would stay high.
        assert max(rep.error_after.values()) < 0.6


def test_negative_reconstruct_is_refused():
    with pytest.raises(UsageError, match="--reconstruct"):
        PruneConfig(target_macs=0.5, reconstruct=-1).validate()


@pytest.mark.needs_cuda
def test_reconstruction_on_cuda_matches_cpu(reference):
    model, pre, calib, _ = reference
    cfg = PruneConfig(target_macs=0.5, criterion="l2", bn_recalib=0, reconstruct=128, device="cpu")
    on_cpu = prune_model(model, pre, cfg, data=calib).model
    on_gpu = prune_model(model, pre, PruneConfig(**{**cfg.__dict__, "device": "cuda"}), data=calib).model
    assert next(on_gpu.parameters()).device.type == "cpu"
    # Sums of float32 products run in another order on the GPU, and each layer's refit reads the layers before
    # it: measured on an H100, the largest difference was 6e-4 of the fc weights' scale (7e-5 elsewhere).
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_gpu.state_dict().items(), strict=True):
        scale = max(1.0, a.float().abs().max().item())
        assert (a.float() - b.float()).abs().max().item() < 2e-3 * scale, name


def test_block_cache_gives_the_same_refit_as_running_from_the_image(reference, monkeypatch):
    import rescompress.pruning.reconstruct as rec

    model, pre, calib, _ = reference
    cfg = PruneConfig(target_macs=0.5, criterion="l2", bn_recalib=0, reconstruct=96, device="cpu")
    cached = prune_model(model, pre, cfg, data=calib)
    monkeypatch.setattr(rec, "_block_chain", lambda *_: [])
    plain = prune_model(model, pre, cfg, data=calib)
    a, b = cached.model.state_dict(), plain.model.state_dict()
    assert cached.report.steps[0].reconstruct.layers == plain.report.steps[0].reconstruct.layers >= 19
    for name in a:
        scale = max(1.0, a[name].float().abs().max().item())
        assert (a[name].float() - b[name].float()).abs().max().item() < 1e-4 * scale, name


def test_a_refit_that_moves_the_logits_away_is_not_kept(reference, monkeypatch):
    """The whole refit is judged on the held-out images after BatchNorm re-estimation: one that leaves the
    logits further from the unpruned model's than the plain pruned weights is dropped, with a note."""
    import rescompress.pruning.pruner as pruner_module
    from rescompress.pruning.reconstruct import reconstruct_layers as real

    def harmful(teacher, student, kept_out, batches, **kw):
        report = real(teacher, student, kept_out, batches, **kw)
        student.fc.weight.data = -student.fc.weight.data  # what a refit learned by heart could do to new images
        return report

    model, pre, calib, _ = reference
    cfg = PruneConfig(target_macs=0.5, criterion="l2", bn_recalib=128, reconstruct=128, device="cpu")
    good = prune_model(model, pre, cfg, data=calib)
    monkeypatch.setattr(pruner_module, "reconstruct_layers", harmful)
    dropped = prune_model(model, pre, cfg, data=calib)
    monkeypatch.undo()
    plain = prune_model(model, pre, PruneConfig(**{**cfg.__dict__, "reconstruct": 0}), data=calib)

    rep = good.report.steps[0].reconstruct
    assert rep.used and rep.logit_error_refit < rep.logit_error_sliced  # measured: ~0.2 vs ~0.5
    rep = dropped.report.steps[0].reconstruct
    assert not rep.used and rep.logit_error_refit > rep.logit_error_sliced
    assert any("kept the plain pruned weights" in n for n in dropped.report.notes)
    # Dropped means the plain pruned model, BatchNorm re-estimated as without reconstruction.
    for (name, a), (_, b) in zip(dropped.model.state_dict().items(), plain.model.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_default_image_count_follows_the_cache_budget(reference):
    from torchvision.models import resnet50

    from rescompress.pruning.pruner import RECONSTRUCT_IMAGES, _default_reconstruct

    model, pre, _, _ = reference
    assert _default_reconstruct(model, torch.zeros(2, *pre.input_shape(1)[1:])) == RECONSTRUCT_IMAGES
    # resnet50 at 224x224: layer1's 256x56x56 outputs, float32, two models, inputs and outputs: 12.8 MB an image.
    assert _default_reconstruct(resnet50().eval(), torch.zeros(1, 3, 224, 224)) == (1 << 30) // (4 * 4 * 256 * 56 * 56)


def test_default_is_on_without_fine_tuning_and_off_before_it(reference):
    from torch.utils.data import Subset

    from rescompress.pruning import FinetuneConfig

    model, pre, calib, _ = reference
    small = Subset(calib, range(96))
    small.info = calib.info  # labeled
    no_ft = prune_model(model, pre, PruneConfig(target_macs=0.6, bn_recalib=32, device="cpu"), data=small)
    assert no_ft.config.reconstruct == 96 and no_ft.report.steps[0].reconstruct.images == 96
    with_ft = prune_model(model, pre, PruneConfig(target_macs=0.6, bn_recalib=32, batch_size=32, device="cpu",
                                                  finetune=FinetuneConfig(epochs=1)), data=small)
    assert with_ft.config.reconstruct == 0 and with_ft.report.steps[0].reconstruct is None
    assert with_ft.report.steps[0].finetune.batches == 3
    assert not any("reconstruct" in n for n in no_ft.report.notes + with_ft.report.notes)
