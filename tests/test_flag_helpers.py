"""The helpers every flag record shares: the with/without timing and the per-epoch meter."""

import pytest

from bkbench.flags.meter import EpochMeter
from bkbench.metrics.with_without import interleaved_medians


def test_with_and_without_alternate_after_one_warm_up_each_and_report_medians():
    calls = []
    times = {"with": iter([9.0, 1.0, 5.0, 2.0]), "without": iter([9.0, 4.0, 8.0, 100.0])}

    def timed(label):
        def call():
            calls.append(label)
            return next(times[label])
        return call

    out = interleaved_medians(timed("with"), timed("without"), repeats=3)
    assert calls == ["with", "without"] * 4      # warm-up pair, then A, B, A, B, A, B
    assert out["with"] == 2.0 and out["without"] == 8.0   # the warm-up calls are left out
    assert out["ratio"] == pytest.approx(0.25)


def test_with_and_without_of_phases_take_each_phase_median():
    seq = iter([(0, 0), (0, 0), (1, 10), (3, 30), (2, 20), (5, 50), (9, 90), (4, 40)])
    out = interleaved_medians(lambda: next(seq), lambda: next(seq), repeats=3)
    assert out["with"] == (2, 20) and out["without"] == (4, 40)
    assert out["ratio"] == pytest.approx(22 / 44)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved_medians(lambda: 1.0, lambda: 1.0, repeats=0)


def test_epoch_meter_means_per_epoch_and_resumes_from_its_state():
    meter = EpochMeter(term=0.0, per_layer=[0.0, 0.0])
    meter.add(term=1.0, per_layer=[1.0, 3.0])
    meter.add(term=2.0, per_layer=[3.0, 5.0])
    assert meter.means() == {"term": 1.5, "per_layer": [2.0, 4.0]}
    resumed = EpochMeter(term=0.0, per_layer=[0.0, 0.0])
    resumed.load_state_dict(meter.state_dict())
    for m in (meter, resumed):
        m.add(term=6.0, per_layer=[0.0, 0.0])
        m.end_epoch(0, extra="x")
        m.add(term=4.0, per_layer=[1.0, 1.0])
        m.end_epoch(1)
    expected = [{"epoch": 1, "term": 3.0, "per_layer": [4 / 3, 8 / 3], "steps": 3, "extra": "x"},
                {"epoch": 2, "term": 4.0, "per_layer": [1.0, 1.0], "steps": 1}]
    assert meter.epochs == expected and resumed.epochs == expected
    assert meter.steps == 0 and meter.means() == {"term": 0.0, "per_layer": [0.0, 0.0]}
