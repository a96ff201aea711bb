"""The benchmark's own arithmetic: the GPU busy time from profiler events, and the spread of timings."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import benchmark  # noqa: E402


def _event(start, end, device=DeviceType.CUDA):
    return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_busy_time_is_the_union_of_device_intervals_without_host_ops():
    events = [
        _event(0, 10),
        _event(5, 20),  # overlaps the first (another stream): counted once
        _event(12, 15),  # inside the second
        _event(30, 40),
        _event(0, 1000, DeviceType.CPU),  # the host op that launched them: not device time
    ]
    assert benchmark.busy_seconds(events) == pytest.approx(30e-6)
    assert len(benchmark.gpu_events(events)) == 4
    assert benchmark.busy_seconds([_event(0, 5, DeviceType.CPU)]) == 0.0


def test_spread_reports_median_quartiles_and_range():
    s = benchmark.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 5.0, 5)
    assert s["p25"] == pytest.approx(1.5) and s["p75"] == pytest.approx(4.5)
    assert benchmark.spread([2.0]) == {"median": 2.0, "p25": 2.0, "p75": 2.0, "min": 2.0, "max": 2.0, "n": 1}
