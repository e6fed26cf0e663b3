"""Calibration math on known distributions, the streaming histogram, and streaming over a real ONNX model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from rescompress.calibration import (
    StreamingHistogram,
    entropy_amax,
    make_calibrator,
    max_amax,
    mse_amax,
    per_channel_max,
    percentile_amax,
)
from rescompress.calibration.collect import (
    calibration_batch_size,
    collect_histograms,
    make_session,
    per_image_sizes,
    with_extra_outputs,
)
from rescompress.calibration.histogram import sample_stride
from rescompress.errors import RescompressError


def _hist(x: np.ndarray, bins: int = 2048) -> StreamingHistogram:
    h = StreamingHistogram(bins, max_samples=None)  # exact: these tests check the math, not sampling
    h.collect(x)
    return h


# ------------------------------------------------------------------------------------------ max / percentile
def test_max_calibrator_is_exact_over_batches():
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, s, size=(4, 8, 5, 5)).astype(np.float32) for s in (0.5, 3.0, 1.0)]
    cal = make_calibrator("max")
    for b in batches:
        cal.collect(b)
    assert cal.compute_amax() == pytest.approx(float(np.max(np.abs(np.concatenate([b.ravel() for b in batches])))))
    cal.reset()
    assert cal.compute_amax() == 0.0
    assert max_amax(np.array([-7.5, 2.0])) == 7.5


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_one_bin(p):
    x = np.random.default_rng(2).standard_t(df=3, size=400_000).astype(np.float32)
    h = _hist(x)
    got = percentile_amax(h.counts, h.range, p)
    expected = float(np.percentile(np.abs(x), p))
    assert abs(got - expected) <= h.range / h.num_bins + 1e-6
    cal = make_calibrator("percentile", percentile=p, histogram=StreamingHistogram(max_samples=None))
    cal.collect(x)
    assert cal.compute_amax() == pytest.approx(got)


def test_percentile_rejects_out_of_range():
    with pytest.raises(RescompressError, match="percentile"):
        percentile_amax(np.ones(8), 1.0, 0.0)


# ------------------------------------------------------------------------------------------ entropy / mse
@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_heavy_tail_is_clipped_below_max(method):
    x = np.random.default_rng(3).standard_t(df=3, size=300_000).astype(np.float32)  # heavy tails
    h = _hist(x)
    fn = entropy_amax if method == "entropy" else mse_amax
    amax = fn(h.counts, h.range, 127, zeros=h.zeros)
    p99 = float(np.percentile(np.abs(x), 99.0))
    assert amax < 0.9 * h.amax  # the rare huge values are clipped ...
    assert amax > p99  # ... but not the bulk of the distribution


def _fake_quant_mse(x: np.ndarray, amax: float, levels: int = 127) -> float:
    s = amax / levels
    return float(np.mean((x - np.clip(np.rint(x / s), -levels, levels) * s) ** 2))


def test_mse_amax_beats_max_and_percentile_on_real_error():
    x = np.random.default_rng(9).laplace(size=200_000).astype(np.float64)
    h = _hist(x)
    best = mse_amax(h.counts, h.range, 127)
    err = _fake_quant_mse(x, best)
    assert err < _fake_quant_mse(x, h.amax)
    assert err < _fake_quant_mse(x, float(np.percentile(np.abs(x), 99.0)))
    assert err <= 1.02 * min(_fake_quant_mse(x, a) for a in np.linspace(0.3, 1.0, 50) * h.amax)


def test_mse_judges_a_step_wider_than_the_data_by_its_real_error():
    """One outlier among N(0, 1) values: a uniform step**2/12 error model picked amax 491, whose real error
    (2.1: the bulk rounds to zero) is twice that of keeping the outlier's range (1.0)."""
    x = np.random.default_rng(0).normal(size=200_000)
    x[0] = 1000.0
    h = _hist(x)
    best = mse_amax(h.counts, h.range, 127, zeros=h.zeros)
    assert _fake_quant_mse(x, best) <= 1.01 * min(_fake_quant_mse(x, a) for a in (491.0, 750.0, 1000.0))


def test_mse_on_uniform_keeps_the_full_range():
    x = np.random.default_rng(4).uniform(-1, 1, size=200_000)
    h = _hist(x)
    assert mse_amax(h.counts, h.range, 127) == pytest.approx(h.amax, rel=0.02)


def test_entropy_ignores_relu_zero_spike():
    # Half the values are exact zeros (ReLU): the threshold must follow the positive half-normal (~4 sigma),
    # not collapse towards the spike (about 2 sigma if the zeros are counted).
    x = np.maximum(np.random.default_rng(5).standard_normal(1_000_000), 0.0)
    h = _hist(x)
    assert h.zeros == int(np.sum(x == 0))
    with_zeros_removed = entropy_amax(h.counts, h.range, 127, zeros=h.zeros)
    naive = entropy_amax(h.counts, h.range, 127, zeros=0)
    assert with_zeros_removed > 3.5
    assert naive < with_zeros_removed


def test_more_levels_never_clip_harder_for_mse():
    x = np.random.default_rng(6).laplace(size=300_000)
    h = _hist(x)
    assert mse_amax(h.counts, h.range, 255) >= mse_amax(h.counts, h.range, 127)


# ------------------------------------------------------------------------------------------ histogram
def test_streaming_histogram_equals_one_shot():
    rng = np.random.default_rng(7)
    # Later batches are wider, so the range doubles (several times) while streaming.
    batches = [rng.normal(0, s, size=50_000).astype(np.float32) for s in (0.1, 0.3, 2.0, 0.5, 7.0)]
    h = StreamingHistogram(1024, max_samples=None)
    for b in batches:
        h.collect(b)
    allv = np.abs(np.concatenate(batches)).astype(np.float64)
    one_shot, _ = np.histogram(allv, bins=1024, range=(0.0, h.range))
    assert h.count == allv.size == int(h.counts.sum())
    assert h.range >= allv.max()
    # Equal bin for bin, up to values lying on a bin edge (float32 vs float64 edge arithmetic).
    assert int(np.abs(h.counts - one_shot).sum()) <= 1e-4 * allv.size
    assert h.counts.shape == (1024,)  # memory does not grow with the data


def test_sampled_histogram_keeps_exact_extremes_and_the_shape():
    x = np.random.default_rng(10).laplace(size=(8, 16, 32, 32)).astype(np.float32)  # 131k values per batch
    full, sampled = StreamingHistogram(512, max_samples=None), StreamingHistogram(512, max_samples=1 << 12)
    for b in (x, 2 * x):
        full.collect(b)
        sampled.collect(b)
    assert sampled.min == full.min and sampled.max == full.max and sampled.range == full.range
    assert sampled.count < full.count / 20
    p_full = percentile_amax(full.counts, full.range, 99.0)
    p_samp = percentile_amax(sampled.counts, sampled.range, 99.0)
    assert p_samp == pytest.approx(p_full, rel=0.05)


def test_sampling_sees_every_column_of_the_feature_map():
    """A 16x28x28 batch of 32 needs a step of about 7, which divides 28: a stride of 7 bins only columns 0, 7,
    14 and 21. The step must share no factor with the image's C*H*W, so the one hot column is seen."""
    x = np.random.default_rng(0).random((32, 16, 28, 28)).astype(np.float32)
    x[..., 1] = 5.0  # 3.6% of the values, all in one column
    assert sample_stride(x.size, 1 << 16) == 7 and 28 % 7 == 0
    step = sample_stride(x.size, 1 << 16, period=16 * 28 * 28)
    assert step == 11 and (16 * 28 * 28) % step
    for shape_period in (56 * 56 * 64, 112 * 112 * 64, 7 * 7 * 2048, 32 * 32 * 16):
        for size in (shape_period * 8, shape_period * 32, shape_period * 128):
            st = sample_stride(size, 1 << 16, shape_period)
            assert st == 1 or shape_period % st, (shape_period, size, st)
    h = StreamingHistogram()  # default sampling
    h.collect(x)
    assert h.count < x.size / 5
    assert percentile_amax(h.counts, h.range, 99.0) == pytest.approx(5.0, rel=0.01)
    counts_hot = h.counts[int(4.99 / h.range * h.num_bins):].sum()
    assert counts_hot / h.count == pytest.approx(1 / 28, rel=0.05)  # the column's share of the sample


def test_doubling_merges_adjacent_bins_exactly():
    h = StreamingHistogram(8)
    h.collect(np.array([0.05, 0.15, 0.3, 0.45, 0.55, 0.8, 1.0], dtype=np.float32))
    before = h.counts.copy()
    h.collect(np.array([1.9], dtype=np.float32))  # forces one doubling, lands in the top new bin
    assert h.range == pytest.approx(2.0)
    np.testing.assert_array_equal(h.counts[:4], before.reshape(4, 2).sum(1))
    assert h.counts[7] == 1 and h.counts[4:7].sum() == 0


def test_histogram_tracks_sign_and_rejects_nan():
    h = _hist(np.array([0.0, 1.0, 2.0]))
    assert h.nonnegative and h.zeros == 1
    h.collect(np.array([-0.5]))
    assert not h.nonnegative and h.amax == 2.0
    with pytest.raises(RescompressError, match="NaN or Inf"):
        h.collect(np.array([1.0, np.nan]))


def test_per_channel_max_matches_torch():
    w = torch.randn(6, 3, 3, 3)
    np.testing.assert_allclose(per_channel_max(w.numpy(), 0), w.abs().amax(dim=(1, 2, 3)).numpy())
    fc = torch.randn(10, 4)
    np.testing.assert_allclose(per_channel_max(fc.numpy().T, 1), fc.abs().amax(dim=1).numpy())


def test_unknown_method():
    with pytest.raises(RescompressError, match="unknown calibration method"):
        make_calibrator("minmax")


# ------------------------------------------------------------------------------------------ streaming over ONNX
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.relu(self.conv(x)), 1), 1))


@pytest.fixture(scope="module", params=[17, 20], ids=["opset17", "opset20"])
def tiny_onnx(tmp_path_factory, request):
    # opset 18 made the reduction axes an input: the in-graph summaries must speak both forms.
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.manual_seed(0)
    torch.onnx.export(
        _Tiny().eval(), torch.randn(2, 3, 16, 16), str(path), dynamo=False, input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=request.param,
    )
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == request.param
    return model


def test_collect_streams_batches_into_histograms(tiny_onnx):
    relu_out = next(n.output[0] for n in tiny_onnx.graph.node if n.op_type == "Relu")
    conv_out = next(n.output[0] for n in tiny_onnx.graph.node if n.op_type == "Conv")
    rng = np.random.default_rng(8)
    batches = [rng.standard_normal((3, 3, 16, 16)).astype(np.float32) * s for s in (1.0, 4.0, 0.5)]
    hists, stats = collect_histograms(tiny_onnx, [conv_out, relu_out], batches)
    assert stats.num_images == 9 and stats.num_batches == 3
    # Reference: the same tensors from one run over all images.
    sess = make_session(with_extra_outputs(tiny_onnx, [conv_out, relu_out]))
    ref_conv, ref_relu = sess.run([conv_out, relu_out], {"input": np.concatenate(batches)})
    assert hists[conv_out].amax == pytest.approx(float(np.abs(ref_conv).max()), rel=1e-5)
    assert hists[conv_out].count == ref_conv.size
    assert hists[relu_out].nonnegative and not hists[conv_out].nonnegative
    assert hists[relu_out].zeros == int(np.sum(ref_relu == 0))


def test_collect_rejects_nan_inputs(tiny_onnx):
    x = np.zeros((2, 3, 16, 16), np.float32)
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(RescompressError, match="NaN or Inf"):
        collect_histograms(tiny_onnx, [tiny_onnx.graph.output[0].name], [x])


def test_in_graph_summaries_match_whole_tensor_histograms(tiny_onnx):
    """Min/max/sample computed inside the ONNX graph give the histogram that whole tensors give."""
    conv_out = next(n.output[0] for n in tiny_onnx.graph.node if n.op_type == "Conv")
    relu_out = next(n.output[0] for n in tiny_onnx.graph.node if n.op_type == "Relu")
    names = ["input", conv_out, relu_out, tiny_onnx.graph.output[0].name]
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((4, 3, 16, 16)).astype(np.float32) * s for s in (1.0, 3.0, 0.7)]
    batches.append(batches[0][:2])  # a short last batch keeps the step, yields fewer samples
    sizes = per_image_sizes(tiny_onnx, names)
    assert sizes == {"input": 3 * 16 * 16, conv_out: 8 * 16 * 16, relu_out: 8 * 16 * 16,
                     tiny_onnx.graph.output[0].name: 4}
    for max_samples in (None, 1000):  # exact, and sampled with a prime step
        got, stats = collect_histograms(tiny_onnx, names, batches, num_bins=256, max_samples=max_samples)
        assert stats.num_images == 14 and stats.num_batches == 4
        sess = make_session(with_extra_outputs(tiny_onnx, names))
        for name in names:
            want = StreamingHistogram(256, max_samples=max_samples)
            for x in batches:
                step = 1 if max_samples is None else sample_stride(sizes[name] * 4, max_samples, sizes[name])
                whole = sess.run([name], {"input": x})[0].reshape(-1)
                want.collect_summary(float(whole.min()), float(whole.max()), whole[::step])
            h = got[name]
            assert (h.min, h.max, h.count, h.zeros, h.range) == pytest.approx(
                (want.min, want.max, want.count, want.zeros, want.range), rel=1e-6)
            np.testing.assert_array_equal(h.counts, want.counts)
        assert got[conv_out].count == (14 * 8 * 16 * 16 if max_samples is None else
                                       sum(-(-len(x) * 2048 // sample_stride(4 * 2048, 1000, 2048)) for x in batches))


def test_calibration_batch_size_follows_the_activation_volume():
    sizes = {"a": 64 * 112 * 112, "b": 256 * 56 * 56, "c": 10}  # float32 elements per image
    per_image = 4 * (64 * 112 * 112 + 256 * 56 * 56 + 10)
    assert calibration_batch_size(sizes, 256) == (256 << 20) // per_image == 41
    assert calibration_batch_size(sizes, 8) == 8
    assert calibration_batch_size({"big": 64 * 1024 * 1024}, 32) == 1  # 256 MB per image: one at a time


def test_entropy_threshold_of_degenerate_histograms_is_finite():
    """A tensor whose values all fall in the top bin (a saturated Softmax output, a constant) leaves every
    narrower candidate with no mass: KL is infinite there, not NaN, and the full range is kept."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 inside the KL search used to warn and yield NaN
        assert entropy_amax(np.r_[np.zeros(2047), 5.0], 1.0) == 1.0
        assert entropy_amax(np.zeros(2048), 1.0) == 0.0
        assert 0 < entropy_amax(np.r_[100.0, np.zeros(2047)], 1.0) < 0.01


def test_max_calibrator_refuses_nan_and_inf():
    from rescompress.calibration.max_calib import MaxCalibrator

    for bad in (np.nan, np.inf):
        cal = MaxCalibrator()
        cal.collect(np.array([1.0, 2.0], np.float32))
        with pytest.raises(RescompressError, match="NaN or Inf"):
            cal.collect(np.array([1.0, bad], np.float32))  # max(0.0, nan) is 0.0: it used to vanish


def test_histogram_of_a_vanishingly_small_tensor_and_its_scale():
    """A range below ~1e-35 overflowed float32 in the bin arithmetic (a bare numpy ValueError); such a
    tensor is zero for any following layer and gets the all-zeros scale, never a subnormal one."""
    from rescompress.quantization.plan import asymmetric_uint8, symmetric_int8, unsigned_uint8

    h = StreamingHistogram(64)
    h.collect(np.array([0.0, 1e-36, -5e-37], np.float32))
    assert h.count == 3 and int(h.counts.sum()) == 3 and h.counts[-1] == 1
    assert h.amax == pytest.approx(1e-36)
    for params in (symmetric_int8(1e-36), unsigned_uint8(1e-36), asymmetric_uint8(-5e-37, 1e-36, 1e-36)):
        assert params.scale == 1.0
    assert symmetric_int8(1e-6).scale == pytest.approx(1e-6 / 127)
