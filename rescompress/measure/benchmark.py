"""Benchmark a baseline against candidates: accuracy, agreement, size, MACs and interleaved latency.

``open_runners`` turns model files (any mix of ``.pt``/``.safetensors`` and ``.onnx``; ``FILE@RUNTIME``
picks a runtime per file) into labeled runners; ``check_compatible_runners`` refuses models that
cannot be compared (class counts, input channels, fixed input sizes); ``run_benchmark`` makes one
pass over the data through every runner (accuracy per model, agreement of each candidate with the
first = baseline) and then times them interleaved (:mod:`rescompress.measure.latency`). Every ONNX
Runtime session is created with thread spinning off unless asked otherwise, and the result says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rescompress.errors import DataError, RescompressError, UsageError
from rescompress.measure.accuracy import AccuracyResult, ProgressFn, evaluate_runners
from rescompress.measure.agreement import Agreement
from rescompress.measure.latency import LatencyReport, measure_latency
from rescompress.measure.model_stats import ModelStats, runner_stats
from rescompress.runtimes import runner_info
from rescompress.spec import Preprocess


@dataclass(frozen=True)
class ModelEntry:
    """One benchmarked model: what it is, how it scored, how it compares with the baseline."""

    label: str
    source: str
    runtime: str
    arch: str | None
    num_classes: int | None
    stats: ModelStats
    accuracy: AccuracyResult | None
    agreement: Agreement | None  # None for the baseline itself

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "source": self.source,
            "runtime": self.runtime,
            "arch": self.arch,
            "num_classes": self.num_classes,
            **self.stats.to_dict(),
            "accuracy": self.accuracy.to_dict() if self.accuracy else None,
            "agreement": self.agreement.to_dict() if self.agreement else None,
        }


@dataclass(frozen=True)
class BenchmarkResult:
    models: tuple[ModelEntry, ...]
    latency: LatencyReport | None
    preprocess: Preprocess
    data: dict | None  # the data source and how many images were evaluated
    settings: dict = field(default_factory=dict)

    @property
    def baseline(self) -> ModelEntry:
        return self.models[0]

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline.label,
            "models": [m.to_dict() for m in self.models],
            "latency": self.latency.to_dict() if self.latency else None,
            "preprocess": self.preprocess.to_dict(),
            "data": self.data,
            "settings": self.settings,
        }


def split_model_spec(spec: str | Path) -> tuple[Path, str]:
    """``"model.onnx@openvino"`` -> (path, "openvino"); a plain existing path -> (path, "auto")."""
    from rescompress.runtimes import RUNTIMES

    text = str(spec)
    if "@" in text and not Path(text).exists():
        path, runtime = text.rsplit("@", 1)
        if runtime in RUNTIMES or runtime == "auto":
            return Path(path), runtime
        if Path(path).exists():
            raise UsageError(f"unknown runtime {runtime!r} in {text}; choose one of: auto, {', '.join(RUNTIMES)}")
    return Path(text), "auto"


def _runtime_for(path: Path, per_file: str, global_runtime: str) -> str:
    """A ``FILE@RUNTIME`` choice wins; a global ``--runtime`` applies to files it can run (not torch files)."""
    from rescompress.runtimes import AUTO_DEFAULT_RUNTIME, resolve_runtime

    if per_file != "auto":
        return per_file
    auto = resolve_runtime(path, "auto")
    if global_runtime == "auto" or auto == AUTO_DEFAULT_RUNTIME:
        return auto
    return global_runtime


def unique_labels(paths: Sequence[Path], runtimes: Sequence[str]) -> list[str]:
    """Short labels (file names), disambiguated with the runtime and then an index where they repeat."""
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.name}@{r}" for p, r in zip(paths, runtimes, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def open_runners(
    models: Sequence[str | Path],
    runtime: str = "auto",
    threads: int | None = None,
    spinning: bool = False,
    arch: str | None = None,
    trust_pickle: bool = False,
    device: str = "cpu",
) -> dict[str, object]:
    """Labeled runners for model files, baseline first (``FILE@RUNTIME`` overrides ``runtime``)."""
    from rescompress.runtimes import make_runner, resolve_runtime

    if not models:
        raise RescompressError("no models given")
    resolve_runtime(None, runtime)  # an unknown --runtime is refused even when only torch files are given
    specs = [split_model_spec(m) for m in models]
    chosen = [resolve_runtime(p, _runtime_for(p, r, runtime)) for p, r in specs]
    labels = unique_labels([p for p, _ in specs], chosen)
    runners: dict[str, object] = {}
    for label, (path, _), rt in zip(labels, specs, chosen, strict=True):
        runners[label] = make_runner(
            path, rt, threads, spinning=spinning, arch=arch, trust_pickle=trust_pickle, device=device
        )
    return runners


def default_preprocess(runners: Mapping[str, object]) -> Preprocess | None:
    """The baseline's recorded preprocessing, else the first candidate's."""
    for r in runners.values():
        if runner_info(r).preprocess is not None:
            return runner_info(r).preprocess
    return None


def check_same_normalization(runners: Mapping[str, object], preprocess: Preprocess, chosen: bool) -> list[str]:
    """Models compared on one input must normalize it alike. A model whose own preprocessing normalizes
    pixels otherwise (mean, std) than ``preprocess`` is refused, unless the user ``chosen`` the normalization
    (--preset/--mean/--std): then the returned warnings say which models run on another than their own."""
    def key(p: Preprocess) -> tuple:  # size and resize follow --input-size; mean/std are the model's
        return (tuple(p.mean_per_channel), tuple(p.std_per_channel))

    other = {k: runner_info(r).preprocess for k, r in runners.items()}
    other = {k: p for k, p in other.items() if p is not None and p.channels == preprocess.channels
             and key(p) != key(preprocess)}
    if not other:
        return []
    listing = "; ".join(f"{k}: mean {list(p.mean_per_channel)}, std {list(p.std_per_channel)}"
                        for k, p in other.items())
    used = f"mean {list(preprocess.mean_per_channel)}, std {list(preprocess.std_per_channel)}"
    if not chosen:
        raise DataError(
            f"the models record different preprocessing ({listing}; used: {used}), so one input cannot suit them "
            "all; pass --preset or --mean/--std to choose one, knowingly"
        )
    return [f"{k} records other preprocessing than the one used ({used})" for k in other]


def check_compatible_runners(runners: Mapping[str, object], preprocess: Preprocess) -> int | None:
    """Refuse runners that cannot be compared on one input; return the common class count."""
    infos = {k: runner_info(r) for k, r in runners.items()}
    classes = {k: i.num_classes for k, i in infos.items() if i.num_classes is not None}
    if len(set(classes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in classes.items())
        raise RescompressError(f"the models output different numbers of classes ({listing}); they cannot be compared")
    for k, info in infos.items():
        check_input_fits(k, info.in_channels, info.input_size, preprocess)
    return next(iter(classes.values()), None)


def check_input_fits(
    name: str, in_channels: int | None, input_size: tuple[int, int] | None, preprocess: Preprocess
) -> None:
    """Refuse preprocessing whose images a model with this input (``None``: any) cannot take."""
    if in_channels is not None and in_channels != preprocess.channels:
        raise DataError(
            f"{name} takes {in_channels}-channel input but the preprocessing gives "
            f"{preprocess.channels} channels; pass --channels {in_channels} or a matching --preset"
        )
    if input_size is not None and tuple(input_size) != tuple(preprocess.size):
        h, w = input_size
        raise DataError(
            f"{name} takes {h}x{w} input (fixed in its graph or recorded with it) but the preprocessing gives "
            f"{preprocess.size[0]}x{preprocess.size[1]}; pass --input-size {h if h == w else f'{h}x{w}'}"
        )


def run_benchmark(
    runners: Mapping[str, object],
    preprocess: Preprocess,
    data: str | Path | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup_s: float = 1.0,
    iters: int = 20,
    rounds: int = 5,
    limit: int | None = None,
    eval_batch_size: int = 64,
    spinning: bool = False,
    progress: ProgressFn | None = None,
    on_block: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Accuracy/agreement over ``data`` (if given) and interleaved latency of ``runners`` (baseline first)."""
    num_classes = check_compatible_runners(runners, preprocess)
    passed = None
    data_info = None
    if data is not None:
        from rescompress.data import check_compatible, make_loader, open_dataset

        dataset = open_dataset(data, preprocess, split="test")
        if num_classes is not None:
            check_compatible(dataset.info, num_classes, purpose="benchmark")
        loader = make_loader(dataset, batch_size=eval_batch_size, limit=limit)
        if log:
            log(f"evaluating {len(runners)} model(s) on {min(len(dataset), limit or len(dataset))} images")
        passed = evaluate_runners(runners, loader, limit=limit, progress=progress)
        data_info = {**dataset.info.to_dict(), "evaluated": passed.n, "labels_sha256": passed.labels_sha256}
    latency = None
    if batch_sizes:
        if log:
            log(
                f"timing {len(runners)} model(s) at batch {','.join(map(str, batch_sizes))}: warm-up {warmup_s:g}s, "
                f"{rounds} rounds x {iters} calls, interleaved"
            )
        baseline_info = runner_info(next(iter(runners.values())))
        latency = measure_latency(
            runners,
            lambda b: baseline_info.input_shape(b, preprocess),
            batch_sizes,
            warmup_s=warmup_s,
            iters=iters,
            rounds=rounds,
            on_block=on_block,
        )
    first = runner_info(next(iter(runners.values()))).input_shape(1, preprocess)
    entries = []
    for k, r in runners.items():
        info = runner_info(r)
        entries.append(
            ModelEntry(
                label=k,
                source=info.source,
                runtime=info.runtime,
                arch=info.arch,
                num_classes=info.num_classes,
                stats=runner_stats(r, first),
                accuracy=passed.accuracy.get(k) if passed else None,
                agreement=passed.agreement.get(k) if passed else None,
            )
        )
    threads = {runner_info(r).threads for r in runners.values()}
    settings = {
        "batch_sizes": list(batch_sizes),
        "threads": threads.pop() if len(threads) == 1 else None,
        "ort_spinning": spinning,
        "warmup_s": warmup_s,
        "iters_per_block": iters,
        "rounds": rounds,
        "limit": limit,
    }
    return BenchmarkResult(tuple(entries), latency, preprocess, data_info, settings)
