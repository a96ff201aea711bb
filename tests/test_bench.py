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


def _kernel(name, start, end):
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start, end=end))


def test_gpu_time_is_split_by_kernel_category():
    events = [
        _kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0, 400),
        _kernel("void pytorch_flash::flash_fwd_kernel<...>", 400, 500),
        _kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 500, 600),
        _kernel("triton_per_fused_add_native_layer_norm_0", 600, 650),
        _kernel("void at::native::(anonymous)::multi_tensor_apply_kernel<...adam...>", 650, 700),
        _kernel("Memcpy DtoD (Device -> Device)", 700, 710),
        _event(0, 5000, DeviceType.CPU),  # a host op: not device time
    ]
    assert benchmark.kernel_category("triton_poi_fused_gelu_1") == "fused elementwise"
    assert benchmark.seconds_by_category(events) == pytest.approx(
        {"matmul": 400e-6, "attention": 200e-6, "fused elementwise": 50e-6, "optimizer": 50e-6, "other": 10e-6}
    )
    assert list(benchmark.seconds_by_category(events))[0] == "matmul"  # largest first


def test_every_benchmark_variant_is_a_valid_config_on_its_graphs_base():
    from config import Config

    for name, (fields, inductor) in benchmark.MODES.items():
        Config(**fields)  # each variant's fields exist and validate
        assert set(inductor) <= {"combo_kernels"}, name
    with pytest.raises(SystemExit, match="autotune, cudnn: CUDA graphs need a CUDA device"):
        benchmark.bench_train(benchmark.torch.device("cpu"), 8, 3, Path("/nonexistent"), modes=["autotune", "cudnn"])
