"""Latency of several runners measured in one run, interleaved, so their ratio survives a noisy machine.

For each batch size every runner gets the same random-normal input. After a warm-up (``warmup_s``
seconds per runner, at least one call), the runners are timed in blocks of ``iters`` calls, one block
per runner per round, for ``rounds`` rounds; the order rotates every round (A B C, B C A, C A B ...) so
that no runner always follows the same neighbour. A runner's latency is the **median of its block
medians** (robust to a block hit by another process); p50/p90/p99 are over all its timed calls;
``spread`` is (max block median - min block median) / median, the run's own noise estimate. The first
runner is the baseline: ``speedup = baseline median / candidate median`` and ``latency_ratio`` is its
inverse. Absolute times are only comparable on the same machine under the same load; ratios are what
a report should quote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from rescompress.errors import RescompressError


@dataclass(frozen=True)
class LatencyStats:
    """One runner at one batch size; times in milliseconds per call."""

    runner: str
    batch: int
    median_ms: float  # median of block medians
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    spread: float  # (max - min block median) / median_ms
    throughput: float  # images per second at median_ms
    calls: int
    block_medians_ms: tuple[float, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_medians_ms"] = list(self.block_medians_ms)
        return d


@dataclass(frozen=True)
class LatencyRatio:
    """A candidate against the baseline at one batch size."""

    runner: str
    batch: int
    speedup: float  # baseline median / candidate median (> 1: candidate faster)
    latency_ratio: float  # candidate median / baseline median (< 1: candidate faster)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LatencyReport:
    baseline: str
    runners: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    warmup_s: float
    iters: int  # timed calls per block
    rounds: int
    stats: tuple[LatencyStats, ...]
    ratios: tuple[LatencyRatio, ...]
    order: tuple[tuple[str, ...], ...]  # runner order of each round (the same for every batch size)
    runner_settings: dict = field(default_factory=dict)  # runner -> threads, runtime settings
    machine: dict = field(default_factory=dict)

    def get(self, runner: str, batch: int) -> LatencyStats:
        for s in self.stats:
            if s.runner == runner and s.batch == batch:
                return s
        raise KeyError((runner, batch))

    def ratio(self, runner: str, batch: int) -> LatencyRatio:
        for r in self.ratios:
            if r.runner == runner and r.batch == batch:
                return r
        raise KeyError((runner, batch))

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "runners": list(self.runners),
            "batch_sizes": list(self.batch_sizes),
            "warmup_s": self.warmup_s,
            "iters_per_block": self.iters,
            "rounds": self.rounds,
            "order": [list(o) for o in self.order],
            "stats": [s.to_dict() for s in self.stats],
            "ratios": [r.to_dict() for r in self.ratios],
            "runner_settings": self.runner_settings,
            "machine": self.machine,
        }


def round_orders(names: Sequence[str], rounds: int) -> list[tuple[str, ...]]:
    """Rotated runner orders, one per round: round r starts with runner ``r % len(names)``."""
    k = len(names)
    return [tuple(names[(r + i) % k] for i in range(k)) for r in range(rounds)]


def summarize(runner: str, batch: int, blocks: Sequence[Sequence[float]]) -> LatencyStats:
    """Statistics of one runner's timed blocks (seconds per call) at one batch size."""
    all_s = np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks])
    block_meds = np.array([np.median(b) for b in blocks], dtype=np.float64)
    med = float(np.median(block_meds))
    p50, p90, p99 = (float(v) for v in np.percentile(all_s, [50, 90, 99]))
    return LatencyStats(
        runner=runner,
        batch=batch,
        median_ms=med * 1e3,
        p50_ms=p50 * 1e3,
        p90_ms=p90 * 1e3,
        p99_ms=p99 * 1e3,
        mean_ms=float(all_s.mean()) * 1e3,
        min_ms=float(all_s.min()) * 1e3,
        max_ms=float(all_s.max()) * 1e3,
        spread=float((block_meds.max() - block_meds.min()) / med) if med > 0 else 0.0,
        throughput=batch / med if med > 0 else float("inf"),
        calls=int(all_s.size),
        block_medians_ms=tuple(float(v) * 1e3 for v in block_meds),
    )


def machine_summary() -> dict:
    from rescompress.system import cpu_features, library_versions

    return {"cpu": cpu_features(), "libraries": library_versions()}


def measure_latency(
    runners: Mapping[str, object],
    input_shape_fn: Callable[[int], tuple[int, ...]],
    batch_sizes: Sequence[int] = (1,),
    warmup_s: float = 1.0,
    iters: int = 20,
    rounds: int = 5,
    seed: int = 0,
    on_block: Callable[[int, int, str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyReport:
    """Time every runner at every batch size, interleaved in rotating blocks (see the module docstring).

    ``input_shape_fn(batch)`` gives the NCHW input shape; ``on_block(batch, round, runner)`` is called
    before each block (progress display).
    """
    names = list(runners)
    if not names:
        raise RescompressError("no runners to time")
    if iters < 1 or rounds < 1:
        raise RescompressError(f"iters and rounds must be at least 1, got iters={iters}, rounds={rounds}")
    if warmup_s < 0:
        raise RescompressError(f"warm-up must be >= 0 seconds, got {warmup_s}")
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise RescompressError(f"batch sizes must be positive integers, got {batch_sizes}")
    orders = round_orders(names, rounds)
    rng = np.random.default_rng(seed)
    stats: list[LatencyStats] = []
    ratios: list[LatencyRatio] = []
    for batch in batch_sizes:
        x = rng.standard_normal(input_shape_fn(batch), dtype=np.float32)
        for name in names:
            start = clock()
            runners[name].run(x)
            while clock() - start < warmup_s:
                runners[name].run(x)
        blocks: dict[str, list[list[float]]] = {k: [] for k in names}
        for r, order in enumerate(orders):
            for name in order:
                if on_block is not None:
                    on_block(batch, r, name)
                run = runners[name].run
                times = []
                for _ in range(iters):
                    t0 = clock()
                    run(x)
                    times.append(clock() - t0)
                blocks[name].append(times)
        per_batch = {k: summarize(k, batch, blocks[k]) for k in names}
        stats.extend(per_batch.values())
        base = per_batch[names[0]].median_ms
        for k in names[1:]:
            cand = per_batch[k].median_ms
            ratios.append(
                LatencyRatio(
                    runner=k,
                    batch=batch,
                    speedup=base / cand if cand > 0 else float("inf"),
                    latency_ratio=cand / base if base > 0 else float("inf"),
                )
            )
    settings = {}
    for k in names:
        info = getattr(runners[k], "info", None)
        settings[k] = info.to_dict() if info is not None and hasattr(info, "to_dict") else {}
    return LatencyReport(
        baseline=names[0],
        runners=tuple(names),
        batch_sizes=batch_sizes,
        warmup_s=float(warmup_s),
        iters=iters,
        rounds=rounds,
        stats=tuple(stats),
        ratios=tuple(ratios),
        order=tuple(orders),
        runner_settings=settings,
        machine=machine_summary(),
    )
