"""The benchmark: its arithmetic (GPU busy time, spread, kernel categories), its variants each in a process
of its own against the first, and what it refuses or skips."""

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


@pytest.mark.parametrize(
    "name, category",
    [  # names as the profiler reports them on an H100 (cuBLAS's Hopper kernels are nvjet_*)
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", "matmul"),
        ("triton_tem_fused_addmm_0", "matmul"),  # an Inductor GEMM template
        ("triton_poi_fused_addmm_gelu_view_3", "fused elementwise"),  # the bias and GELU after a GEMM
        ("triton_red_fused__to_copy_addmm_native_layer_norm_2", "fused elementwise"),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", "other"),  # cuDNN, not attention
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ],
)
def test_kernel_categories_on_real_kernel_names(name, category):
    assert benchmark.kernel_category(name) == category


def test_every_benchmark_variant_is_a_valid_config_on_its_graphs_base():
    from config import Config

    for name, (fields, inductor) in benchmark.MODES.items():
        Config(**fields)  # each variant's fields exist and validate
        assert set(inductor) <= {"combo_kernels"}, name
    cpu = benchmark.torch.device("cpu")
    assert benchmark.unavailable("autotune", cpu) == "CUDA graphs need a CUDA device"
    assert benchmark.unavailable("eager", cpu) == "" and benchmark.unavailable("compile", cpu) == ""


def test_a_variant_the_card_lacks_is_skipped_with_its_reason_and_the_others_run(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    props = SimpleNamespace(name="Tesla T4", multi_processor_count=40)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    t4 = torch.device("cuda")
    assert "compute capability 8.0" in benchmark.unavailable("flash", t4)
    assert "40 SMs" in benchmark.unavailable("autotune", t4)
    assert benchmark.unavailable("graphs", t4) == "" and benchmark.unavailable("combo", t4) == ""


def test_too_few_epochs_to_time_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["train", "--epochs", "1"])
    assert "--epochs must be 2 or more" in capsys.readouterr().err
    with pytest.raises(ValueError, match="leave none to time after 2 warm-up epochs"):
        benchmark.bench_epochs(benchmark.torch.device("cpu"), None, 2, warm=2)


def test_evaluation_never_pads_a_loader_past_its_own_images(cifar):
    import torch

    from evaluation import Evaluator

    rows = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            rows.append(len(x))
            return torch.zeros(len(x), 10)

    evaluator = Evaluator(cifar, 10_000, 64, None)  # eval10k: 50 test images and 64 clean training images
    evaluator.scores(Recorder())
    assert rows == [50, 64]  # not 10,000 rows each


@pytest.mark.slow  # two child processes, each a tiny model for 2 epochs
def test_the_cpu_dry_run_times_each_mode_in_its_own_process_against_the_first(tmp_path, capsys):
    report = tmp_path / "bench.json"
    benchmark.main(["train", "--tiny", "--device", "cpu", "--modes", "eager,compile,graphs", "--epochs", "3",
                    "--variant-epochs", "2", "--batch-size", "500", "--out", str(tmp_path / "out"),
                    "--json", str(report)])  # fmt: skip
    import json

    figures = json.loads(report.read_text())["train"]
    assert figures["eager"]["config"]["epochs"] == 3 and figures["compile"]["config"]["epochs"] == 2
    assert figures["eager"]["compile_mode"] is None and figures["compile"]["compile_mode"] == "default"
    assert figures["compile"]["over_baseline"] == pytest.approx(
        figures["compile"]["whole_epoch_s"]["median"] / figures["eager"]["whole_epoch_s"]["median"]
    )
    assert figures["graphs"] == {"skipped": "CUDA graphs need a CUDA device"}
    table = capsys.readouterr().out
    assert "| eager (None) | 3 |" in table and "| compile (default) | 2 |" in table
    assert "| graphs | skipped: CUDA graphs need a CUDA device |" in table
    # a second call on the same folder times fresh runs (it resumed the first call's finished ones and timed
    # nothing before), keeping the kernel cache; no checkpoint or lock is left behind
    benchmark.main(["train", "--tiny", "--device", "cpu", "--modes", "eager", "--epochs", "3", "--batch-size", "500",
                    "--out", str(tmp_path / "out"), "--json", str(report)])  # fmt: skip
    again = json.loads(report.read_text())["train"]["eager"]
    assert again["whole_epoch_s"]["n"] == 1 and again["config"]["run_name"] != figures["eager"]["config"]["run_name"]
    assert len(list((tmp_path / "out" / "calls").iterdir())) == 2
    assert sorted(p.name for p in (tmp_path / "out" / "ck").iterdir()) == ["compile_cache"]


def test_a_mode_that_fails_makes_the_command_fail(tmp_path, capsys):
    report = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match="eager measured nothing"):  # a real child failing: batch size 0
        benchmark.main(["train", "--tiny", "--device", "cpu", "--modes", "eager", "--epochs", "3", "--batch-size",
                        "0", "--out", str(tmp_path), "--json", str(report)])  # fmt: skip
    import json

    assert "batch_size must be an integer >= 1" in json.loads(report.read_text())["train"]["eager"]["failed"][0]


@pytest.mark.slow  # a child process started, then cut
def test_a_benchmark_cut_by_its_time_limit_says_so_and_exits_non_zero(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    report = tmp_path / "bench.json"
    args = [sys.executable, benchmark.__file__, "train", "--tiny", "--device", "cpu", "--modes", "eager,compile",
            "--epochs", "30", "--out", str(tmp_path / "out"), "--json", str(report)]  # fmt: skip
    parent = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "calls").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first mode's child is starting: 30 epochs leave it running for a while
    parent.send_signal(signal.SIGINT)  # as `timeout -s INT` does
    out, _ = parent.communicate(timeout=120)
    assert parent.returncode != 0, out
    figures = json.loads(report.read_text())["train"]
    assert figures["eager"] == {"failed": ["cut off (interrupted: a time limit?)"]}
    assert "eager, compile measured nothing" in out and "| compile | failed: not run: cut off before it |" in out
