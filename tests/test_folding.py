"""BatchNorm folding: the tensor formula against a float64 reference, and whole models by equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from rescompress.checkpoint import CheckpointHeader, load_checkpoint, save_checkpoint
from rescompress.folding import (
    FoldError,
    FoldReport,
    count_batchnorm,
    fold_batchnorm,
    fold_conv_bn_weights,
    fold_linear_bn_weights,
)
from rescompress.models import build_model
from rescompress.spec import get_preset

# Module-level folding reorders float32 arithmetic; the bound for the logits, relative to their scale.
REL_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so a wrong fold shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref64, out64 = ref.double(), out.double()
    return float((out64 - ref64).abs().max() / ref64.abs().max())


def reference_fold(w, b, rm, rv, eps, gamma, beta):
    """The folding formula written out per output channel in float64 numpy (independent of the code)."""
    w = w.double().numpy()
    out = w.shape[0]
    b = np.zeros(out) if b is None else b.double().numpy()
    gamma = np.ones(out) if gamma is None else gamma.double().numpy()
    beta = np.zeros(out) if beta is None else beta.double().numpy()
    rm, rv = rm.double().numpy(), rv.double().numpy()
    w_ref = np.empty_like(w)
    b_ref = np.empty(out)
    for o in range(out):
        s = gamma[o] / np.sqrt(rv[o] + eps)
        w_ref[o] = w[o] * s
        b_ref[o] = (b[o] - rm[o]) * s + beta[o]
    return w_ref, b_ref


# ---------------------------------------------------------------------------------------------- tensor level
@pytest.mark.parametrize(
    "weight_shape",
    [(8, 3, 3, 3), (12, 4, 1, 1), (16, 2, 3, 3), (6, 5, 7), (5, 4, 3, 3, 3), (10, 20)],
    ids=["conv3x3", "conv1x1", "grouped(16,in/g=2)", "conv1d", "conv3d", "linear"],
)
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_tensor_fold_matches_float64_reference(weight_shape, conv_bias, affine):
    gen = torch.Generator().manual_seed(7)
    out = weight_shape[0]
    w = torch.randn(weight_shape, generator=gen)
    b = torch.randn(out, generator=gen) if conv_bias else None
    rm = torch.randn(out, generator=gen)
    rv = torch.rand(out, generator=gen) * 3 + 1e-3
    gamma = torch.randn(out, generator=gen) if affine else None
    beta = torch.randn(out, generator=gen) if affine else None
    eps = 1e-5

    w_f, b_f = fold_conv_bn_weights(w, b, rm, rv, eps, gamma, beta)
    w_ref, b_ref = reference_fold(w, b, rm, rv, eps, gamma, beta)

    assert w_f.shape == w.shape and w_f.dtype == torch.float32
    assert b_f.shape == (out,) and b_f.dtype == torch.float32
    # float64 arithmetic then one rounding to float32: within half an ulp of the exact value (2**-24 relative).
    np.testing.assert_allclose(w_f.numpy(), w_ref, rtol=2**-24, atol=0)
    np.testing.assert_allclose(b_f.numpy(), b_ref, rtol=2**-24, atol=1e-45)

    # Cross-check with PyTorch's own (float32) fusion where its conventions apply.
    if len(weight_shape) >= 3:
        w_t, b_t = fuse_conv_bn_weights(
            w, b, rm, rv, eps, gamma if affine else torch.ones(out), beta if affine else torch.zeros(out)
        )
        torch.testing.assert_close(w_f, w_t.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b_f, b_t.detach(), rtol=1e-6, atol=1e-6)


def test_tensor_fold_float64_inputs_are_exact():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    rm, rv = torch.randn(4, generator=gen, dtype=torch.float64), torch.rand(4, generator=gen, dtype=torch.float64)
    gamma, beta = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    w_f, b_f = fold_linear_bn_weights(w, None, rm, rv, 1e-3, gamma, beta)
    w_ref, b_ref = reference_fold(w, None, rm, rv, 1e-3, gamma, beta)
    assert w_f.dtype == torch.float64
    np.testing.assert_allclose(w_f.numpy(), w_ref, rtol=1e-15, atol=0)
    np.testing.assert_allclose(b_f.numpy(), b_ref, rtol=1e-15, atol=1e-300)


def test_tensor_fold_rejects_mismatched_channels_and_missing_stats():
    w = torch.randn(8, 3, 3, 3)
    with pytest.raises(FoldError, match="8 outputs"):
        fold_conv_bn_weights(w, None, torch.zeros(4), torch.ones(4), 1e-5, None, None)
    with pytest.raises(FoldError, match="running statistics"):
        fold_conv_bn_weights(w, None, None, None, 1e-5, None, None)


# ---------------------------------------------------------------------------------------------- whole models
TORCHVISION_DEPTHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
]


@pytest.mark.parametrize("arch", TORCHVISION_DEPTHS)
def test_fold_torchvision_resnets(arch):
    model = randomize_bn(build_model(arch, num_classes=10), seed=TORCHVISION_DEPTHS.index(arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = count_batchnorm(model)
    x = torch.randn(1, 3, 64, 64)

    result = fold_batchnorm(model, probe=x)
    folded, report = result.model, result.report

    # One BN per conv in these architectures, every one foldable.
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(report.folded) == n_bn == n_conv
    assert report.left == ()
    assert count_batchnorm(folded) == 0
    assert isinstance(folded, type(model))
    assert ("layer1.0.conv1", "layer1.0.bn1") in report.folded
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in report.folded
    assert isinstance(folded.get_submodule("layer1.0.bn1"), nn.Identity)
    assert folded.get_submodule("layer1.0.conv1").bias is not None
    # The input model is untouched.
    assert count_batchnorm(model) == n_bn
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    assert report.max_rel_diff <= REL_TOL
    assert report.top1_agreement == 100.0
    assert report.probe_shape == (1, 3, 64, 64)
    # An independent check on another batch (smaller images keep the deep models quick on 2 cores).
    with torch.no_grad():
        y = torch.randn(2, 3, 32, 32)
        ref, out = model(y), folded(y)
    assert rel_err(ref, out) <= REL_TOL
    assert torch.equal(ref.argmax(1), out.argmax(1))


def test_fold_cifar_resnet20_on_real_images(eval_npz):
    from rescompress.data import make_loader, open_dataset

    pre = get_preset("fashion-mnist")
    model = randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    result = fold_batchnorm(model, input_shape=pre.input_shape(8)[1:])
    assert result.report.probe_shape == (8, 1, 28, 28)
    assert len(result.report.folded) == 21 and count_batchnorm(result.model) == 0

    images, _ = next(iter(make_loader(open_dataset(eval_npz, pre), batch_size=64, shuffle=False)))
    with torch.no_grad():
        ref, out = model(images), result.model(images)
    assert rel_err(ref, out) <= REL_TOL
    assert torch.equal(ref.argmax(1), out.argmax(1))


def test_fold_reference_model(reference_checkpoint, eval_npz):
    if not reference_checkpoint.exists():
        pytest.skip("reference model not trained yet")
    from rescompress.data import make_loader, open_dataset

    model, header = load_checkpoint(reference_checkpoint)
    result = fold_batchnorm(model, input_shape=header.preprocess.input_shape(8))
    images, _ = next(iter(make_loader(open_dataset(eval_npz, header.preprocess), batch_size=128, shuffle=False)))
    with torch.no_grad():
        ref, out = model(images), result.model(images)
    assert count_batchnorm(result.model) == 0
    assert rel_err(ref, out) <= REL_TOL
    assert torch.equal(ref.argmax(1), out.argmax(1))


def test_fold_tolerance_rule_uses_float64_only_past_rtol():
    base = dict(folded=(), left=(), max_abs_diff=4e-5, max_rel_diff=3e-5, top1_agreement=100.0, probe_shape=(8,))
    assert not FoldReport(**base).within_tolerance
    # Measured on resnet50 at 224x224: the folded model is nearer the exact logits than the original.
    assert FoldReport(**base, original_fp64_rel_error=2.0e-5, folded_fp64_rel_error=1.5e-5).within_tolerance
    assert not FoldReport(**base, original_fp64_rel_error=1e-6, folded_fp64_rel_error=3e-5).within_tolerance
    assert not FoldReport(**{**base, "max_rel_diff": 1e-7, "top1_agreement": 75.0}).within_tolerance

    # A small model stays within 1e-5, so no float64 run is made.
    report = fold_batchnorm(randomize_bn(build_model("resnet20", 10, 1)), input_shape=(1, 28, 28)).report
    assert report.within_tolerance and report.original_fp64_rel_error is None
    assert report.to_dict()["within_tolerance"] is True


def test_folded_checkpoint_round_trip(tmp_path):
    pre = get_preset("fashion-mnist")
    model = randomize_bn(build_model("resnet20", num_classes=10, in_channels=1))
    folded = fold_batchnorm(model, input_shape=(1, 28, 28)).model
    path = save_checkpoint(folded, tmp_path / "f.safetensors", CheckpointHeader("resnet20", 10, 1, pre, folded=True))
    loaded, header = load_checkpoint(path)
    assert header.folded
    assert count_batchnorm(loaded) == 0
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


# ---------------------------------------------------------------------------------------------- graph cases
class _Residual(nn.Module):
    """Odd (pruned-like) widths, a BN after an add, a conv whose output is used twice, Linear->BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 13, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(13)
        self.conv2 = nn.Conv2d(13, 13, 3, padding=1, groups=13)
        self.bn2 = nn.BatchNorm2d(13, affine=False)
        self.conv3 = nn.Conv2d(13, 13, 1)
        self.bn3 = nn.BatchNorm2d(13)  # consumes conv3, whose output also feeds the add
        self.bn_after_add = nn.BatchNorm2d(13)
        self.fc1 = nn.Linear(13, 7)
        self.bn_fc = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        z = self.conv3(y)
        x = self.bn_after_add(self.bn3(z) + z)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(torch.relu(self.bn_fc(self.fc1(x))))


def test_fold_reports_left_batchnorms_with_reasons():
    model = randomize_bn(_Residual())
    result = fold_batchnorm(model, input_shape=(3, 16, 16))
    report = result.report
    assert set(report.folded) == {("conv1", "bn1"), ("conv2", "bn2"), ("fc1", "bn_fc")}
    left = dict(report.left)
    assert set(left) == {"bn3", "bn_after_add"}
    assert "also used by" in left["bn3"]
    assert "add" in left["bn_after_add"]
    assert isinstance(result.model.bn_fc, nn.Identity) and isinstance(result.model.bn3, nn.BatchNorm2d)
    assert report.max_rel_diff <= REL_TOL and report.top1_agreement == 100.0
    assert report.to_dict()["num_folded"] == 3 and report.to_dict()["num_left"] == 2


class _SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3)
        self.conv_b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.seq_fc = nn.Linear(5, 6)
        self.bn_seq = nn.BatchNorm1d(6)

    def forward(self, x):
        a = self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))
        return a.mean(dim=(2, 3))


class _LinearOn3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):  # (N, 5, 5): BN1d normalizes axis 1, which is not the Linear's feature axis
        return self.bn(self.fc(x)).flatten(1)


def test_fold_leaves_shared_bn_and_linear_on_3d_input():
    shared = fold_batchnorm(randomize_bn(_SharedBN()), input_shape=(3, 8, 8)).report
    assert shared.folded == ()
    assert dict(shared.left)["bn"].startswith("BatchNorm is applied 2 times")
    assert dict(shared.left)["bn_seq"] == "not used in forward"

    lin = fold_batchnorm(randomize_bn(_LinearOn3D()), probe=torch.randn(4, 5, 5)).report
    assert lin.folded == ()
    assert "not 2-D" in dict(lin.left)["bn"]


def test_fold_refuses_training_mode_and_batch_statistics():
    model = build_model("resnet20", num_classes=10, in_channels=1)
    model.train()
    with pytest.raises(FoldError, match=r"training mode.*eval\(\)"):
        fold_batchnorm(model, input_shape=(1, 28, 28))
    model.eval()
    model.bn1 = nn.BatchNorm2d(16, track_running_stats=False).eval()
    with pytest.raises(FoldError, match="bn1 has no running statistics"):
        fold_batchnorm(model, input_shape=(1, 28, 28))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x)).flatten(1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_fold_untraceable_and_torchscript_models_are_refused():
    with pytest.raises(FoldError, match="torch.fx cannot trace _DataDependent"):
        fold_batchnorm(_DataDependent().eval(), input_shape=(1, 8, 8))
    scripted = torch.jit.script(build_model("resnet20", num_classes=10, in_channels=1).eval())
    with pytest.raises(FoldError, match="TorchScript"):
        fold_batchnorm(scripted, input_shape=(1, 28, 28))


def test_fold_wrong_probe_shape_is_a_clear_error():
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    with pytest.raises(FoldError, match=r"probe of shape \(8, 3, 28, 28\)"):
        fold_batchnorm(model, input_shape=(3, 28, 28))


def test_sigterm_mid_write_leaves_no_temporary_file(tmp_path):
    """CI timeouts and `docker stop` send SIGTERM: the output being written is dropped whole, like Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from torchvision.models import resnet50

    src = tmp_path / "r50.pt"
    torch.save(resnet50(num_classes=10).state_dict(), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "rescompress", "fold", str(src), "--input-size", "32", "-o",
                             str(out_dir / "r50.safetensors")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in out_dir.iterdir()):
        assert proc.poll() is None, "the fold finished before its temporary file was seen"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and b"interrupted" in err
    assert list(out_dir.iterdir()) == []


def test_frozen_batchnorm_folds_and_the_checkpoint_says_so(tmp_path):
    """torchvision's FrozenBatchNorm2d (detection backbones) is a BatchNorm too: folded like one, and a model
    that still holds one is not recorded as folded."""
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = resnet18(num_classes=4, norm_layer=FrozenBatchNorm2d).eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    assert count_batchnorm(model) == 20
    result = fold_batchnorm(model, input_shape=(2, 3, 48, 48))
    assert len(result.report.folded) == 20 and not result.report.left
    assert ("conv1", "bn1") in result.report.folded and count_batchnorm(result.model) == 0
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    header = CheckpointHeader(arch="resnet18", num_classes=4, in_channels=3, preprocess=get_preset("imagenet"))
    save_checkpoint(model, tmp_path / "unfolded.safetensors", header)
    assert load_checkpoint(tmp_path / "unfolded.safetensors")[1].folded is False
