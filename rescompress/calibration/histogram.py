"""A fixed-size streaming histogram of |x| whose range grows by doubling, so memory never grows with data.

Each batch is binned into ``num_bins`` equal bins on ``[0, range]``. When a batch holds a value above the
range, the range doubles (repeatedly if needed) and adjacent bin pairs merge: the new bins' edges are
every other old edge, so the re-binned counts are exactly what a one-shot histogram on the final range
would hold. Min, max and the count of exact zeros are tracked alongside (zeros matter for the MSE search
and min >= 0 marks tensors that may use an unsigned range).

Min and max are exact over every value. A batch larger than ``max_samples`` values is binned through a
strided view (a prime stride that does not divide one image's C*H*W, so it does not alias with the rows
and columns of NCHW data): over many batches that is still millions of samples per tensor, and binning
costs as much as running the model.
``zeros`` and ``count`` are in histogram units (sampled values, each weighted, see ``collect_summary``).
"""

from __future__ import annotations

import numpy as np

from rescompress.errors import RescompressError

DEFAULT_BINS = 2048
CHUNK = 1 << 20  # values binned at a time: bounds the temporaries to a few MB whatever the tensor size
DEFAULT_MAX_SAMPLES = 1 << 16  # values binned per tensor per batch


def _next_prime(n: int) -> int:
    def is_prime(k: int) -> bool:
        return k > 1 and all(k % d for d in range(2, int(k**0.5) + 1))

    while not is_prime(n):
        n += 1
    return n


def sample_stride(size: int, max_samples: int, period: int | None = None) -> int:
    """The stride that keeps at most about ``max_samples`` of ``size`` values: 1, or a prime.

    ``period`` is the size of one image's tensor (C*H*W). The prime is chosen not to divide it: a stride
    that divides the width (7 for a 28- or 56-wide map) would visit the same few columns of every row and
    never see the others. A prime that does not divide C*H*W shares no factor with C, H or W, so the
    samples cycle through every position of the image's tensor.
    """
    if size <= max_samples:
        return 1
    step = _next_prime(-(-size // max_samples))
    while period and period % step == 0:
        step = _next_prime(step + 1)
    return step


class StreamingHistogram:
    """Histogram of absolute values with exact, allocation-free range growth."""

    def __init__(self, num_bins: int = DEFAULT_BINS, max_samples: int | None = DEFAULT_MAX_SAMPLES) -> None:
        if num_bins < 2 or num_bins % 2:
            raise RescompressError(f"histogram bin count must be an even number >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.max_samples = max_samples
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.range = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.zeros = 0
        self.count = 0

    @property
    def amax(self) -> float:
        """Largest |x| seen."""
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def nonnegative(self) -> bool:
        return self.count > 0 and self.min >= 0.0

    def collect(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        flat = x.reshape(-1)
        if flat.size == 0:
            return
        lo, hi_signed = float(flat.min()), float(flat.max())
        if self.max_samples is not None and flat.size > self.max_samples:
            period = int(np.prod(x.shape[1:])) if x.ndim >= 2 else None  # one image's C*H*W
            flat = flat[:: sample_stride(flat.size, self.max_samples, period)]
        self.collect_summary(lo, hi_signed, flat)

    def collect_summary(self, lo: float, hi_signed: float, sample: np.ndarray, weight: float = 1.0) -> None:
        """Add one batch given as its exact min and max and a (strided) sample of its values.

        :meth:`collect` computes these itself; the calibration collector gets them from the model run
        (``ReduceMin``/``ReduceMax`` and a strided ``Slice`` inside the graph), so whole activation
        tensors never leave ONNX Runtime. ``weight``: how many values each sampled one stands for, relative
        to the other batches' samples (a batch sampled with a stride ``k`` times larger passes ``k``); the
        counts become fractional then.
        """
        flat = np.asarray(sample).reshape(-1)
        if not (np.isfinite(lo) and np.isfinite(hi_signed)) or not np.isfinite(flat.sum(dtype=np.float64)):
            raise RescompressError("activation values contain NaN or Inf; check the model weights and inputs")
        if flat.size == 0:
            return
        if weight != 1.0 and self.counts.dtype != np.float64:
            self.counts = self.counts.astype(np.float64)

        def weighted(v):  # (integers stay integers unweighted)
            return v if weight == 1.0 else v * weight

        hi = max(abs(lo), abs(hi_signed))
        self.min = min(self.min, lo)
        self.max = max(self.max, hi_signed)
        self.zeros += weighted(int(flat.size - np.count_nonzero(flat)))
        self.count += weighted(int(flat.size))
        if hi == 0.0 and self.range == 0.0:
            self.counts[0] += weighted(flat.size)  # all zeros so far: no range yet, but they belong in the first bin
            return
        if self.range == 0.0:
            self.range = hi
        while hi > self.range:
            self._double()
        k = self.num_bins / self.range
        dtype = np.float32 if k < 1e30 else np.float64  # a range below ~1e-35 would overflow float32 to inf
        for start in range(0, flat.size, CHUNK):
            a = np.abs(flat[start : start + CHUNK].astype(dtype, copy=False))
            a *= dtype(k)
            idx = a.astype(np.int32)
            np.minimum(idx, self.num_bins - 1, out=idx)
            self.counts += weighted(np.bincount(idx, minlength=self.num_bins))

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts[: len(merged)] = merged
        self.counts[len(merged):] = 0
        self.range *= 2.0

    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.range, self.num_bins + 1)

    def to_dict(self) -> dict:
        return {
            "num_bins": self.num_bins, "max_samples": self.max_samples, "range": self.range, "min": self.min,
            "max": self.max, "zeros": self.zeros, "count": self.count,
        }


class HistogramCalibrator:
    """The collecting half shared by the histogram calibrators: each adds ``method`` and ``compute_amax``.

    ``histogram`` may be one already collected (and shared between methods); it is used, not copied.
    """

    method: str

    def __init__(self, histogram: StreamingHistogram | None = None) -> None:
        self.histogram = histogram if histogram is not None else StreamingHistogram()

    def reset(self) -> None:
        self.histogram.reset()

    def collect(self, x: np.ndarray) -> None:
        self.histogram.collect(x)
