"""Speed and memory of the augmentation and of the training step, as ratios against a baseline
measured in the same run (these machines are shared and noisy).

    python bench/benchmark.py aug              # any machine: batched RandAugment vs torchvision per image
    python bench/benchmark.py train            # whole epochs (median, spread) vs the model-only floor, per compile mode
    python bench/benchmark.py train --tiny --epochs 4   # a CPU dry run of the same script
    python bench/benchmark.py all --json out.json

Every figure is printed with the device, torch version and date it was taken on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Config  # noqa: E402
from data import CifarTensors  # noqa: E402
from randomaug import RandAugment  # noqa: E402
from step import attention_backend  # noqa: E402
from training import Trainer  # noqa: E402

EPOCH_IMAGES = 50_000


def header(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
    }
    print("# " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls, synchronised before and after."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------------------------------


def bench_aug(device: torch.device, batches: int, tv_images: int) -> dict:
    """RandAugment(N=2, M=9, mstd 0.5) on uint8 batches of 256 vs torchvision v2 RandAugment per image."""
    from torchvision.transforms import v2

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    ours = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    ours(x, g)  # warm-up
    t = timed(lambda: [ours(x, g) for _ in range(batches)], device, repeats=2)
    ours_rate = batches * 256 / t

    tv = v2.RandAugment(num_ops=2, magnitude=9)  # torchvision's default 31 magnitude bins
    cpu_images = torch.randint(0, 256, (tv_images, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    tv(cpu_images[0])
    t_tv = timed(lambda: [tv(img) for img in cpu_images], torch.device("cpu"))
    tv_rate = tv_images / t_tv
    if device.type == "cuda":  # the GPU (masked, compiled) path against the CPU (grouped) path
        op, level, sign = ours.draw(256, device, g)
        ref = ours.apply(x.cpu(), op.cpu(), level.cpu(), sign.cpu())
        for name, fn in (("eager", ours.apply), ("compiled", torch.compile(ours.apply, dynamic=False))):
            diff = (fn(x, op, level, sign).cpu().int() - ref.int()).abs()
            print(
                f"GPU {name} vs CPU: max |diff| {diff.max().item()}, pixels differing {(diff > 0).float().mean():.2e}"
            )
    result = {
        "ours_images_per_s": ours_rate,
        "torchvision_per_image_cpu_images_per_s": tv_rate,
        "speedup": ours_rate / tv_rate,
    }
    print(
        f"batched RandAugment on {device}: {ours_rate:,.0f} img/s | torchvision v2 RandAugment per image "
        f"(CPU, 1 process): {tv_rate:,.0f} img/s | ratio {ours_rate / tv_rate:.1f}x"
    )
    return result


def synthetic_cifar(device: torch.device, n_train: int = 50_000, n_test: int = 10_000) -> CifarTensors:
    g = torch.Generator(device=device).manual_seed(0)

    def imgs(n):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)

    def labels(n):
        return torch.randint(0, 10, (n,), device=device, generator=g)

    return CifarTensors(imgs(n_train), labels(n_train), imgs(n_test), labels(n_test))


def spread(values: list[float]) -> dict:
    """Median, quartiles, min and max (the machines are shared: a best-of-n hides what users wait for)."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "min": v[0], "max": v[-1], "n": len(v)}


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def model_only(trainer: Trainer, steps: int, repeats: int = 5) -> dict:
    """Seconds for ``steps`` optimizer steps on one batch already on the device, with the trainer's
    own compile mode (CUDA graphs when it uses them), in training mode (drop path on), as an epoch
    trains: the floor a whole epoch is compared with. An epoch ends in evaluation (eval mode), so the
    model is put back in training mode first; a graph compiled while timing raises."""
    trainer.model.train()
    x, y = next(iter(trainer.train_loader))
    x, targets = trainer.mixup.mix(x, y, 1.0)
    x, targets = x.clone(), targets.clone()
    for _ in range(steps):  # untimed: anything still to compile or record happens here
        trainer.train_step(x, targets)
    graphs = compiled_graphs()
    times = []
    for _ in range(repeats):
        sync(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(x, targets)
        sync(trainer.device)
        times.append(time.perf_counter() - start)
    if compiled_graphs() != graphs:
        raise RuntimeError("a graph was compiled while the floor was timed: it does not time the training graph")
    return spread(times)


def gpu_busy(trainer: Trainer, steps: int = 30) -> dict:
    """Share of the wall time of ``steps`` full steps (index, augment, mixup, train step) in which a
    GPU kernel runs, from the profiler (its own host overhead makes this a lower bound), and the GPU
    kernels it saw per step: replays of CUDA graphs should still show their kernels; a count near
    zero under graphs means the profiler did not trace inside them, and the fraction is not valid."""
    from torch.profiler import ProfilerActivity, profile

    trainer.model.train()
    batches = iter(trainer.train_loader)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            trainer.train_step(*trainer.mixup(x, y))
        sync(trainer.device)
        wall = time.perf_counter() - start
    events = prof.events()
    return {
        "fraction": busy_seconds(events) / wall,
        "kernels_per_step": len(gpu_events(events)) / steps,
        "ms_per_step_by_category": {k: 1000 * v / steps for k, v in seconds_by_category(events).items()},
    }


def gpu_events(events) -> list:
    """The device-side events (kernels, copies) of a profile; not the host ops that launched them,
    whose ``self_device_time_total`` repeats their kernels' time."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA]


def busy_seconds(events) -> float:
    """Seconds in which at least one device event runs (the union of their intervals, so kernels
    overlapping on several streams count once)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in gpu_events(events)):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6  # the profiler's times are in microseconds


def bench_epochs(device: torch.device, cfg: Config, epochs: int, warm: int = 2) -> dict:
    """Whole epochs as a user waits for them (train, evaluation on the test set and the clean training
    images, checkpoint), through ``Trainer.run_epoch`` with real files, then the model-only floor of
    the same trainer and, on CUDA, the GPU's busy fraction and peak memory."""
    data = synthetic_cifar(device)
    trainer = Trainer(cfg, data, progress="off")
    trainer.resume()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, rows = [], []
    for epoch in trainer.remaining_epochs():
        start = time.perf_counter()
        row = trainer.run_epoch(epoch)
        walls.append(time.perf_counter() - start - row["compile_seconds"])
        rows.append(row)
    trainer.files.wait_for_saves()
    steady = rows[warm:]
    per_epoch = EPOCH_IMAGES / (trainer.steps_per_epoch * cfg.batch_size)  # to 50k-image epochs
    with attention_backend(cfg.attention):  # as run_epoch trains
        floor = model_only(trainer, trainer.steps_per_epoch)
    whole = spread(walls[warm:])
    train = spread([r["train_seconds"] for r in steady])
    result = {
        "compile_mode": trainer.compile_mode,
        "compile_seconds": trainer.compile_clock.seconds,
        "whole_epoch_s": whole,
        "train_s": train,
        "eval_s": spread([r["eval_seconds"] for r in steady]),
        "checkpoint_s": spread([r["checkpoint_seconds"] for r in steady]),
        "model_only_epoch_s": {k: v * per_epoch if k != "n" else v for k, v in floor.items()},
        "train_over_model_only": train["median"] / floor["median"],
        "whole_over_model_only": whole["median"] / floor["median"],
        "200_epochs_min": (trainer.compile_clock.seconds + 200 * whole["median"]) / 60,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        with attention_backend(cfg.attention):
            busy = gpu_busy(trainer)
        result["gpu_busy_fraction"], result["gpu_kernels_per_step"] = busy["fraction"], busy["kernels_per_step"]
        result["gpu_ms_per_step_by_category"] = busy["ms_per_step_by_category"]
    return result


GRAPHS = dict(compile=True, cuda_graphs=True)  # CUDA only
# mode -> (config fields, Inductor settings): the compile modes, then variants of graphs to compare with it.
MODES = {
    "graphs": (GRAPHS, {}),
    "compile": (dict(compile=True, cuda_graphs=False), {}),
    "eager": (dict(compile=False), {}),
    "autotune": ({**GRAPHS, "autotune": True}, {}),  # Inductor's autotuned matmuls (compile paid once: cache)
    "cudnn": ({**GRAPHS, "attention": "cudnn"}, {}),  # cuDNN attention against
    "flash": ({**GRAPHS, "attention": "flash"}, {}),  # FlashAttention, for 65 tokens
    "combo": (GRAPHS, {"combo_kernels": True}),  # Inductor's combo kernels
    "eval10k": ({**GRAPHS, "eval_batch_size": 10_000}, {}),  # the test set in one forward pass
}
# Kernel name fragments -> category, first match wins: where a step's GPU time goes.
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "cutlass", "cublas", "sm90_xmma", "matmul", "mm_")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("fused elementwise", ("triton",)),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((category for category, parts in KERNEL_CATEGORIES if any(p in low for p in parts)), "other")


def seconds_by_category(events) -> dict[str, float]:
    """Device time per kernel category (summed durations: kernels on several streams count each)."""
    totals: dict[str, float] = {}
    for e in gpu_events(events):
        category = kernel_category(e.name)
        totals[category] = totals.get(category, 0.0) + (e.time_range.end - e.time_range.start) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def bench_train(
    device: torch.device,
    batch_size: int,
    epochs: int,
    out_dir: Path,
    tiny: bool = False,
    modes: Optional[list[str]] = None,
    on_result: Optional[Callable[[str, dict], None]] = None,
) -> dict:
    """The default configuration (or a tiny one for a CPU dry run) in each compile mode, same run;
    ``on_result(mode, figures)`` is called as each mode finishes (a cut-off run keeps what it measured)."""
    modes = modes or (["graphs", "compile"] if device.type == "cuda" else ["eager"])
    if device.type != "cuda" and set(modes) - {"compile", "eager"}:
        raise SystemExit(f"{', '.join(sorted(set(modes) - {'compile', 'eager'}))}: CUDA graphs need a CUDA device")
    size = dict(dim=32, depth=2, heads=2) if tiny else {}
    results = {}
    for name in modes:
        cfg = Config(
            batch_size=batch_size,
            epochs=epochs,
            device=str(device),
            run_name=f"bench_{name}",
            checkpoint_dir=str(out_dir / "ck"),
            log_dir=str(out_dir / "log"),
            plot_dir=str(out_dir / "plots"),
            **size,
            **MODES[name][0],
        )
        with torch._inductor.config.patch(**MODES[name][1]):
            results[name] = bench_epochs(device, cfg, epochs)
        if on_result is not None:
            on_result(name, results[name])
        torch.cuda.empty_cache() if device.type == "cuda" else None
    model = "tiny model (dim 32, depth 2)" if tiny else "default model (dim 384, depth 6, heads 6, DyT)"
    print(f"\n{model}, batch {batch_size}, {epochs} epochs per mode, seconds per 50k-image epoch (median [p25-p75]):")
    cols = ["mode", "compile", "whole epoch", "train", "eval", "checkpoint", "model-only", "train/model", "whole/model",
            "200 epochs", "busy", "kernels/step", "peak GiB"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")

    def s(d):
        return f"{d['median']:.2f} [{d['p25']:.2f}-{d['p75']:.2f}]"

    for name, r in results.items():
        print(
            f"| {name} ({r['compile_mode']}) | {r['compile_seconds']:.0f} s | {s(r['whole_epoch_s'])} | "
            f"{s(r['train_s'])} | "
            f"{s(r['eval_s'])} | {s(r['checkpoint_s'])} | {s(r['model_only_epoch_s'])} | "
            f"{r['train_over_model_only']:.2f} | {r['whole_over_model_only']:.2f} | {r['200_epochs_min']:.1f} min | "
            f"{r.get('gpu_busy_fraction', float('nan')):.0%} | {r.get('gpu_kernels_per_step', float('nan')):.0f} | "
            f"{r.get('peak_memory_gib', float('nan')):.2f} |"
        )
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["aug", "train", "all"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=22, help="epochs per mode (the first 2 are warm-up)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: checks the script, not the targets")
    ap.add_argument("--aug-batches", type=int, default=20, help="batches of 256 for our RandAugment")
    ap.add_argument("--tv-images", type=int, default=2000, help="images for torchvision's per-image RandAugment")
    ap.add_argument(
        "--modes", help=f"comma-separated, of {', '.join(MODES)} (default: graphs,compile on CUDA, eager elsewhere)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    modes = args.modes.split(",") if args.modes else None
    if modes and not set(modes) <= set(MODES):
        ap.error(f"--modes: unknown {', '.join(sorted(set(modes) - set(MODES)))}; choose from {', '.join(MODES)}")
    report = {"conditions": header(device)}

    def save() -> None:  # after every part, so a run cut off by a time limit keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    if args.what in ("aug", "all"):
        report["aug"] = bench_aug(device, args.aug_batches, args.tv_images)
        if device.type == "cuda":
            report["aug_cpu"] = bench_aug(torch.device("cpu"), max(1, args.aug_batches // 10), args.tv_images)
        save()
    if args.what in ("train", "all"):
        report["train"] = {}

        def keep(mode: str, figures: dict) -> None:
            report["train"][mode] = figures
            save()

        with tempfile.TemporaryDirectory() as tmp:
            bench_train(device, args.batch_size, args.epochs, Path(tmp), tiny=args.tiny, modes=modes, on_result=keep)


if __name__ == "__main__":
    main()
