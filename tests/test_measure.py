"""Measurement math: agreement on hand-made logits, accuracy on real data, latency report structure, gate checks."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from rescompress.data import limit_indices, make_loader, open_dataset
from rescompress.errors import DataError, RescompressError
from rescompress.export import export_onnx
from rescompress.loading import onnx_summary
from rescompress.measure import (
    SQNR_CAP_DB,
    collect_logits,
    compare_logits,
    evaluate_accuracy,
    evaluate_runners,
    measure_latency,
)
from rescompress.measure.accuracy import AccuracyCounter, topk_correct
from rescompress.measure.agreement import AgreementCounter, kl_per_row, sqnr_db
from rescompress.measure.benchmark import check_compatible_runners, run_benchmark
from rescompress.measure.gate import (
    GateCheck,
    GateMetrics,
    GateResult,
    GateThresholds,
    check_agreement,
    check_drop,
    check_latency,
    junit_xml,
)
from rescompress.measure.latency import round_orders
from rescompress.measure.model_stats import onnx_params_macs
from rescompress.measure.report import latency_rows, model_rows, to_markdown
from rescompress.models import build_model
from rescompress.profile import count_macs
from rescompress.runtimes import RunnerInfo, make_runner
from rescompress.spec import get_preset

FMNIST = get_preset("fashion-mnist")


# ------------------------------------------------------------------------------------------ agreement
def test_identical_logits_agree_fully_and_hit_the_sqnr_cap():
    b = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    a = compare_logits(b, b.copy())
    assert a.top1_agreement == 100.0 and a.n == 16
    assert a.max_abs_diff == 0.0 and a.mean_abs_diff == 0.0 and a.mean_kl == 0.0
    assert a.sqnr_db == SQNR_CAP_DB and a.identical
    assert json.loads(json.dumps(a.to_dict()))["sqnr_db"] == SQNR_CAP_DB  # finite, valid JSON


def test_known_perturbation_gives_known_sqnr_and_diffs():
    b = np.random.default_rng(1).standard_normal((32, 5))
    a = compare_logits(b, 1.1 * b)  # noise = 0.1 b  ->  SQNR = 10 log10(1 / 0.01) = 20 dB exactly
    assert a.sqnr_db == pytest.approx(20.0, abs=1e-9)
    assert a.top1_agreement == 100.0  # scaling keeps every argmax
    assert a.max_abs_diff == pytest.approx(0.1 * np.abs(b).max(), rel=1e-12)
    assert a.mean_abs_diff == pytest.approx(0.1 * np.abs(b).mean(), rel=1e-12)
    b2 = np.ones((4, 3))
    assert compare_logits(b2, b2 + 0.01).sqnr_db == pytest.approx(40.0, abs=1e-9)


def test_kl_and_top1_agreement_by_hand():
    b = np.array([[0.0, 0.0], [2.0, 0.0]])
    c = np.array([[math.log(3.0), 0.0], [0.0, 2.0]])
    # Row 0: p = (1/2, 1/2), q = (3/4, 1/4): KL = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3).
    kl0 = 0.5 * math.log(4.0 / 3.0)
    # Row 1: p = softmax(2, 0), q = softmax(0, 2): KL = (p0 - p1) * 2 * ... computed exactly:
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    kl1 = float((p * (np.log(p) - np.log(p[::-1]))).sum())
    np.testing.assert_allclose(kl_per_row(b, c), [kl0, kl1], rtol=1e-12)
    a = compare_logits(b, c)
    assert a.top1_agreement == 50.0  # row 0: ties -> class 0 vs class 0; row 1: 0 vs 1
    assert a.mean_kl == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    assert a.max_abs_diff == pytest.approx(2.0)


def test_streaming_agreement_equals_one_shot():
    rng = np.random.default_rng(2)
    b = rng.standard_normal((50, 7))
    c = b + rng.normal(0, 0.3, b.shape)
    one = compare_logits(b, c)
    counter = AgreementCounter()
    for s in range(0, 50, 16):
        counter.update(b[s : s + 16], c[s : s + 16])
    two = counter.result()
    for field in ("top1_agreement", "max_abs_diff", "mean_abs_diff", "mean_kl", "sqnr_db"):
        assert getattr(two, field) == pytest.approx(getattr(one, field), rel=1e-12)


def test_agreement_edges():
    assert sqnr_db(0.0, 1.0) == -SQNR_CAP_DB
    assert sqnr_db(1.0, 0.0) == SQNR_CAP_DB
    with pytest.raises(RescompressError, match="same number of classes"):
        compare_logits(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(RescompressError, match="NaN"):
        compare_logits(np.zeros((1, 3)), np.array([[0.0, np.nan, 0.0]]))


# ------------------------------------------------------------------------------------------ accuracy
def test_topk_and_counter_by_hand():
    logits = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3, 0.4, 0.0], [1, 2, 3, 4, 5, 6.0]])
    labels = np.array([1, 5, 0])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 5) == 1  # row 1: label 5 is the smallest; row 2: label 0 too
    c = AccuracyCounter()
    c.update(logits, labels)
    r = c.result()
    assert (r.n, r.correct1, r.correct5) == (3, 1, 1)
    assert r.top1 == pytest.approx(100 / 3)
    few = AccuracyCounter()
    few.update(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 1]))
    assert few.result().top5 is None and few.result().top1 == 50.0
    five = AccuracyCounter()  # five classes: top-5 would be 100% by construction
    five.update(np.eye(5)[[0, 1]], np.array([1, 1]))
    assert five.result().top5 is None and five.result().top1 == 50.0
    from rescompress.quantization.fidelity import compare

    fid = compare(np.eye(5)[[0, 1]], np.eye(5)[[0, 0]], np.array([1, 1]))
    assert fid.top5 is None and fid.fp32_top5 is None and fid.top1 == 0.0 and fid.fp32_top1 == 50.0
    ranked = np.array([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])  # label 1: 2nd, then 5th largest
    fid6 = compare(ranked, ranked[::-1], np.array([1, 1]))
    assert fid6.top5 == 100.0 and fid6.top1 == 0.0
    # Ties: top-k breaks them towards the lower index, as top-1 does, so it always holds the top-1 class.
    tied = np.array([[1, 1, 0, 1, 0, 0, 0, 1, 2, 1, 2, 2, 1, 2, 2, 2, 1.0]])  # argmax (top-1) is class 8
    assert topk_correct(tied, np.array([8]), 1) == 1
    assert topk_correct(tied, np.array([8]), 5) == 1
    assert topk_correct(tied, np.array([13]), 5) == 1 and topk_correct(tied, np.array([15]), 5) == 0
    with pytest.raises(DataError, match="labeled"):
        AccuracyCounter().update(np.zeros((1, 3)), np.array([-1]))
    with pytest.raises(DataError, match="out of range"):
        AccuracyCounter().update(np.zeros((1, 3)), np.array([3]))


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, in_channels=1).eval()


def test_accuracy_matches_collected_logits_on_real_data(small_model, eval_npz):
    ds = open_dataset(eval_npz, FMNIST)
    runner = make_runner(small_model, threads=1)
    acc = evaluate_accuracy(runner, make_loader(ds, batch_size=50, limit=150))
    logits, labels = collect_logits(runner, make_loader(ds, batch_size=64, limit=150))
    assert logits.shape == (150, 10) and labels.shape == (150,)
    np.testing.assert_array_equal(labels, np.load(eval_npz)["y"][limit_indices(len(ds), 150)])
    assert acc.n == 150
    assert acc.correct1 == int((logits.argmax(1) == labels).sum())
    assert acc.correct5 == topk_correct(logits, labels, 5)


def test_reference_model_accuracy_on_bundled_slice(reference_checkpoint, eval_npz):
    if not reference_checkpoint.exists():
        pytest.skip("the trained reference checkpoint is not bundled yet")
    runner = make_runner(reference_checkpoint, threads=1)
    ds = open_dataset(eval_npz, runner.info.preprocess)
    acc = evaluate_accuracy(runner, make_loader(ds, batch_size=100, limit=500))
    assert acc.n == 500
    assert acc.top1 >= 85.0  # trained to >= 91% on the full test set
    assert acc.top5 >= acc.top1


def test_evaluate_runners_one_pass(small_model, eval_npz, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(small_model, FMNIST, path, arch="resnet20", num_classes=10)
    runners = {"torch": make_runner(small_model, threads=1), "ort": make_runner(path, threads=1)}
    ds = open_dataset(eval_npz, FMNIST)
    ev = evaluate_runners(runners, make_loader(ds, batch_size=40), limit=100, keep_predictions=True)
    assert ev.n == 100 and ev.labeled
    assert set(ev.accuracy) == {"torch", "ort"} and set(ev.agreement) == {"ort"}
    assert ev.agreement["ort"].top1_agreement == 100.0
    assert ev.agreement["ort"].sqnr_db > 100.0  # FP32 export: only rounding differences
    assert ev.predictions["ort"].shape == (100,)
    assert ev.accuracy["torch"].correct1 == ev.accuracy["ort"].correct1
    again = evaluate_runners(runners, make_loader(ds, batch_size=64), limit=100)
    assert again.labels_sha256 == ev.labels_sha256  # same images in the same order, any batch size


def test_unlabeled_data_refused_when_labels_required(small_model, tmp_path):
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros((4, 28, 28), np.uint8))
    ds = open_dataset(npz, FMNIST)
    runner = make_runner(small_model)
    with pytest.raises(DataError, match="labeled"):
        evaluate_accuracy(runner, make_loader(ds, batch_size=2))
    ev = evaluate_runners({"a": runner, "b": runner}, make_loader(ds, batch_size=2))
    assert not ev.labeled and ev.accuracy == {} and ev.agreement["b"].top1_agreement == 100.0


# ------------------------------------------------------------------------------------------ latency
class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class CostRunner:
    """A runner whose every call costs a fixed virtual time: the latency math becomes exact."""

    def __init__(self, name: str, clock: VirtualClock, cost_per_image: float, log: list) -> None:
        self.name = name
        self.clock = clock
        self.cost = cost_per_image
        self.log = log
        self.info = RunnerInfo("virtual", name, 3, 1, None, None)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.log.append((self.name, batch.shape, float(batch.sum())))
        self.clock.t += self.cost * batch.shape[0]
        return np.zeros((batch.shape[0], 3), np.float32)


def test_latency_math_is_exact_with_a_virtual_clock():
    clock, log = VirtualClock(), []
    runners = {
        "base": CostRunner("base", clock, 0.004, log),
        "fast": CostRunner("fast", clock, 0.001, log),
        "slow": CostRunner("slow", clock, 0.008, log),
    }
    rep = measure_latency(
        runners, lambda b: (b, 1, 4, 4), batch_sizes=(1, 4), warmup_s=0.01, iters=3, rounds=4, clock=clock
    )
    assert rep.baseline == "base" and rep.batch_sizes == (1, 4)
    fast1 = rep.get("fast", 1)
    assert fast1.median_ms == pytest.approx(1.0) and fast1.p99_ms == pytest.approx(1.0)
    assert fast1.spread == pytest.approx(0.0) and fast1.calls == 12 and len(fast1.block_medians_ms) == 4
    assert rep.get("slow", 4).median_ms == pytest.approx(32.0)
    assert rep.get("base", 4).throughput == pytest.approx(4 / 0.016)
    assert rep.ratio("fast", 1).speedup == pytest.approx(4.0)
    assert rep.ratio("slow", 4).latency_ratio == pytest.approx(2.0)
    # Order rotates every round; the same input array goes to every runner at a batch size.
    assert [list(o) for o in rep.order] == [
        ["base", "fast", "slow"], ["fast", "slow", "base"], ["slow", "base", "fast"], ["base", "fast", "slow"],
    ]
    for shape in ((1, 1, 4, 4), (4, 1, 4, 4)):
        assert len({s for _, sh, s in log if sh == shape}) == 1
    # Warm-up: base at batch 1 costs 4 ms, so 3 calls reach 10 ms; then 4 rounds x 3 timed calls.
    assert sum(1 for n, sh, _ in log if n == "base" and sh == (1, 1, 4, 4)) == 3 + 12
    d = rep.to_dict()
    assert d["iters_per_block"] == 3 and len(d["stats"]) == 6 and len(d["ratios"]) == 4


def test_latency_report_structure_with_real_runners(small_model, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(small_model, FMNIST, path, arch="resnet20", num_classes=10)
    runners = {"torch": make_runner(small_model, threads=1), "ort": make_runner(path, threads=1)}
    rep = measure_latency(runners, lambda b: (b, 1, 28, 28), batch_sizes=(1, 2), warmup_s=0.0, iters=2, rounds=3)
    for b in (1, 2):
        s_base, s_c = rep.get("torch", b), rep.get("ort", b)
        assert s_c.calls == 6 and len(s_c.block_medians_ms) == 3
        assert s_c.min_ms <= s_c.p50_ms <= s_c.p90_ms <= s_c.p99_ms <= s_c.max_ms
        assert s_c.median_ms == pytest.approx(float(np.median(s_c.block_medians_ms)))
        assert s_c.throughput == pytest.approx(b / (s_c.median_ms / 1e3))
        r = rep.ratio("ort", b)
        assert r.speedup == pytest.approx(s_base.median_ms / s_c.median_ms)
        assert r.latency_ratio == pytest.approx(1 / r.speedup)
    assert rep.runner_settings["ort"]["settings"]["intra_op_spinning"] is False
    assert "avx2" in rep.machine["cpu"]
    with pytest.raises(RescompressError):
        measure_latency(runners, lambda b: (b, 1, 28, 28), iters=0)


def test_round_orders():
    assert round_orders(["a", "b"], 3) == [("a", "b"), ("b", "a"), ("a", "b")]


# ------------------------------------------------------------------------------------------ stats, benchmark
def test_onnx_macs_match_torch_count(small_model, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(small_model, FMNIST, path, arch="resnet20", num_classes=10)
    params, macs = onnx_params_macs(path, (1, 1, 28, 28))
    assert macs == count_macs(small_model, (1, 1, 28, 28))
    assert 0 < params <= sum(p.numel() for p in small_model.parameters())
    # The unfolded torch model counts as its folded export does (a benchmark table shows both side by side).
    from rescompress.profile import count_folded_params

    assert count_folded_params(small_model, (1, 1, 28, 28)) == params
    # A conv with a bias (the BN folds into it), affine=False BN (the fold creates a bias), a BatchNorm1d head.
    odd = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=True), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4, affine=False), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
    ).eval()
    assert count_folded_params(odd, (1, 3, 16, 16)) == (8 * 27 + 8) + (4 * 8 + 4) + (4 * 5 + 5)
    # A Q/DQ INT8 file (ONNX Runtime's own quantizer) has the same convolutions: same MACs.
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": np.random.default_rng(0).standard_normal((2, 1, 28, 28), np.float32)}])

        def get_next(self):
            return next(self.batches, None)

    qdq = tmp_path / "m.qdq.onnx"
    quantize_static(str(path), str(qdq), Reader(), quant_format=QuantFormat.QDQ)
    q_params, q_macs = onnx_params_macs(qdq, (1, 1, 28, 28))
    assert q_macs == macs and q_params == params  # the same weights, stored as int8; scales are not params
    assert onnx_summary(qdq).params == q_params  # `inspect` counts the same way as `benchmark`


def test_benchmark_and_markdown(small_model, eval_npz, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(small_model, FMNIST, path, arch="resnet20", num_classes=10)
    runners = {"torch": make_runner(small_model, threads=1), "m.onnx": make_runner(path, threads=1)}
    res = run_benchmark(runners, FMNIST, eval_npz, batch_sizes=(1,), warmup_s=0.0, iters=2, rounds=2, limit=64)
    assert [m.label for m in res.models] == ["torch", "m.onnx"]
    assert res.models[1].agreement.top1_agreement == 100.0 and res.models[0].agreement is None
    assert res.models[1].stats.file_bytes == path.stat().st_size
    assert res.models[0].stats.macs == res.models[1].stats.macs
    assert res.data["evaluated"] == 64 and res.settings["ort_spinning"] is False
    assert len(latency_rows(res)) == 2 and len(model_rows(res)) == 2
    md = to_markdown(res)
    assert "| m.onnx | onnxruntime |" in md and "spinning: off" in md
    assert md.count("\n| torch | 1 |") == 1  # one latency row per model and batch
    json.dumps(res.to_dict())  # JSON-serializable as is


def test_incompatible_runners_refused(small_model):
    other = make_runner(build_model("resnet20", num_classes=7, in_channels=1))
    with pytest.raises(RescompressError, match="different numbers of classes"):
        check_compatible_runners({"a": make_runner(small_model), "b": other}, FMNIST)
    with pytest.raises(DataError, match="1-channel input"):
        check_compatible_runners({"a": make_runner(small_model)}, FMNIST.with_overrides(channels=3))


# ------------------------------------------------------------------------------------------ gate
def test_gate_checks_at_the_edges():
    base, cand = 100 * 1283 / 2000, 100 * 1273 / 2000  # 64.15% vs 63.65%: 10 of 2000 images = 0.5 points
    assert base - cand > 0.5  # float rounding: the raw difference is above the threshold ...
    assert check_drop("d", base, cand, 0.5).passed  # ... but the documented edge passes
    assert not check_drop("d", base, 100 * 1272 / 2000, 0.5).passed
    assert check_drop("d", 90.0, 91.0, 0.0).passed  # an improvement is a negative drop
    assert check_agreement("a", 99.0, 99.0).passed and not check_agreement("a", 98.99, 99.0).passed
    assert check_latency("l", 1.2, 1.2, 1).passed and not check_latency("l", 1.21, 1.2, 1).passed
    with pytest.raises(RescompressError, match="percentage"):
        GateThresholds(min_agreement=120)


def _metrics(top1: float) -> GateMetrics:
    return GateMetrics("m.onnx", "onnxruntime", 10, top1, None, 100, int(top1), "ab" * 32, {}, None, (1, 2, 3))


def test_junit_xml_parses_with_one_testcase_per_check():
    checks = (check_drop("accuracy_drop", 90.0, 80.0, 0.5), check_agreement("top1_agreement", 99.5, 99.0))
    result = GateResult(checks, _metrics(80.0), _metrics(90.0), None, GateThresholds())
    assert result.verdict == "FAILED: accuracy_drop"
    root = ET.fromstring(junit_xml(result))
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"accuracy_drop", "top1_agreement"}
    assert "must be <= 0.5" in cases["accuracy_drop"].find("failure").get("message")
    assert cases["top1_agreement"].find("failure") is None


def test_gate_metrics_round_trip_and_bad_files(tmp_path):
    m = _metrics(88.5)
    path = m.save(tmp_path / "m.json")
    assert GateMetrics.load(path) == m
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"top1": 1}))
    with pytest.raises(RescompressError, match="not a rescompress gate metrics file"):
        GateMetrics.load(bad)
    with pytest.raises(RescompressError, match="does not exist"):
        GateMetrics.load(tmp_path / "nope.json")
    assert isinstance(GateCheck("x", True, 0.0, 1.0, "<=", "").message, str)


def test_one_output_is_a_binary_classifier():
    """A single logit z is class 1 where z > 0: agreement, accuracy and KL follow the sign, not argmax
    (which is always 0 for one column, so two unrelated models used to agree 100%)."""
    from rescompress.measure.agreement import predicted_class

    b = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    c = np.array([[1.5], [1.0], [-0.5], [-2.0]])
    assert predicted_class(b).tolist() == [1, 0, 1, 0]
    agr = compare_logits(b, c)
    assert agr.top1_agreement == 50.0 and agr.mean_kl > 0.0
    assert topk_correct(b, np.array([1, 0, 0, 0]), 1) == 3
    acc = AccuracyCounter()
    acc.update(c, np.array([1, 1, 0, 0]))
    assert acc.result().top1 == 100.0 and acc.result().top5 is None
