"""Benchmark results as table rows, and as a Markdown report with the same tables.

Three tables: one row per model (accuracy, size, params, MACs), one row per candidate (agreement with
the baseline: top-1 %, max/mean |Δlogit|, KL, SQNR) and one row per model and batch size (latency
median and percentiles in ms, throughput, spread, speed-up over the baseline). The
CLI renders the same rows with rich; the Markdown report adds the settings that make the numbers
reproducible (threads, ORT spinning, warm-up, blocks, machine).
"""

from __future__ import annotations

import math
from typing import Any

from rescompress.measure.benchmark import BenchmarkResult

MODEL_COLUMNS = ("model", "runtime", "top1", "top5", "MB", "params", "MMACs")
AGREEMENT_COLUMNS = ("model", "agree%", "max|Δ|", "mean|Δ|", "KL", "SQNR dB")
LATENCY_COLUMNS = ("model", "batch", "median ms", "p50", "p90", "p99", "img/s", "spread", "speed-up")


def model_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    rows = []
    for m in result.models:
        a, g = m.accuracy, m.agreement
        rows.append({
            "model": m.label,
            "runtime": m.runtime,
            "top1": a.top1 if a else None,
            "top5": a.top5 if a else None,
            "agree%": g.top1_agreement if g else None,
            "max|Δ|": g.max_abs_diff if g else None,
            "mean|Δ|": g.mean_abs_diff if g else None,
            "KL": g.mean_kl if g else None,
            "SQNR dB": g.sqnr_db if g else None,
            "MB": m.stats.file_bytes / 1e6 if m.stats.file_bytes is not None else None,
            "params": m.stats.params,
            "MMACs": m.stats.macs / 1e6 if m.stats.macs is not None else None,
        })
    return rows


def latency_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    rep = result.latency
    if rep is None:
        return []
    rows = []
    for batch in rep.batch_sizes:
        for name in rep.runners:
            s = rep.get(name, batch)
            speedup = 1.0 if name == rep.baseline else rep.ratio(name, batch).speedup
            rows.append({
                "model": name,
                "batch": batch,
                "median ms": s.median_ms,
                "p50": s.p50_ms,
                "p90": s.p90_ms,
                "p99": s.p99_ms,
                "img/s": s.throughput,
                "spread": s.spread,
                "speed-up": speedup,
            })
    return rows


def settings_line(result: BenchmarkResult) -> str:
    s = result.settings
    threads = s.get("threads")
    parts = [
        f"threads: {threads if threads is not None else 'runtime default'}",
        f"ONNX Runtime thread spinning: {'on' if s.get('ort_spinning') else 'off'}",
    ]
    if result.latency is not None:
        parts.append(
            f"warm-up {s.get('warmup_s'):g}s, {s.get('rounds')} rounds x {s.get('iters_per_block')} calls per block, "
            "interleaved with rotating order; latency = median of block medians"
        )
    if result.data is not None:
        parts.append(f"data: {result.data.get('path')} ({result.data.get('evaluated')} images)")
    return "; ".join(parts)


def _md_cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    head = "| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(_md_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def to_markdown(result: BenchmarkResult, title: str = "rescompress benchmark") -> str:
    """The benchmark as a Markdown document: settings, model table, latency table, machine."""
    lines = [f"# {title}", "", f"Baseline: `{result.baseline.label}`. {settings_line(result)}.", ""]
    rows = model_rows(result)
    lines += ["## Models", "", markdown_table(rows, MODEL_COLUMNS), ""]
    if len(rows) > 1 and result.data is not None:
        lines += [
            f"## Agreement with the baseline (`{result.baseline.label}`)", "",
            "SQNR = 10·log10(Σb² / Σ(b−c)²) of the logits, capped at 200 dB (= identical); KL in nats.", "",
            markdown_table(rows[1:], AGREEMENT_COLUMNS), "",
        ]
    if result.latency is not None:
        lines += [
            "## Latency", "",
            "Times in ms per call (median = median of block medians). Speed-up = baseline median / model median at the "
            "same batch size, measured in the same run.", "",
            markdown_table(latency_rows(result), LATENCY_COLUMNS), "",
        ]
        cpu = result.latency.machine.get("cpu", {})
        libs = result.latency.machine.get("libraries", {})
        lib_text = ", ".join(f"{k} {v}" for k, v in libs.items() if v)
        lines += ["## Machine", "", f"{cpu.get('model')} ({cpu.get('logical_cores')} logical cores); {lib_text}", ""]
    return "\n".join(lines)
