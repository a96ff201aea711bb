"""Speed and memory of the augmentation and of the training step, as ratios against a baseline
measured in the same run (these machines are shared and noisy).

    python bench/benchmark.py aug              # any machine: batched RandAugment vs torchvision per image
    python bench/benchmark.py train            # whole epochs (median, spread) vs the model-only floor, per compile mode
    python bench/benchmark.py train --modes graphs,cudnn,flash --epochs 8 --variant-epochs 5   # variants vs graphs
    python bench/benchmark.py train --tiny --epochs 3 --modes eager,compile   # a CPU dry run of the same script
    python bench/benchmark.py all --json out.json

Every figure is printed with the device, torch version and date it was taken on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
TINY_IMAGES = 2_000  # --tiny: a dry run of the script on a CPU, not a measurement


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


def bench_epochs(device: torch.device, cfg: Config, epochs: int, warm: int = 2, images: int = EPOCH_IMAGES) -> dict:
    if epochs <= warm:
        raise ValueError(f"{epochs} epochs leave none to time after {warm} warm-up epochs: give more than {warm}")
    """Whole epochs as a user waits for them (train, evaluation on the test set and the clean training
    images, checkpoint), through ``Trainer.run_epoch`` with real files, then the model-only floor of
    the same trainer and, on CUDA, the GPU's busy fraction and peak memory."""
    data = synthetic_cifar(device, images, images // 5)
    trainer = Trainer(cfg, data, progress="off")
    if trainer.resume():
        trainer.close()
        raise RuntimeError(
            f"{trainer.paths.latest} holds {trainer.epoch} epochs already: a benchmark times a fresh run "
            f"(bench_train names each call's runs apart)"
        )
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
    per_epoch = len(data.x_train) / (trainer.steps_per_epoch * cfg.batch_size)  # to the epoch timed whole
    with attention_backend(cfg.attention):  # as run_epoch trains
        floor = model_only(trainer, trainer.steps_per_epoch)
    whole = spread(walls[warm:])
    train = spread([r["train_seconds"] for r in steady])
    result = {
        "config": cfg.to_dict(),
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
ATTENTION_WORDS = ("flash", "fmha", "attention", "sdpa")  # FlashAttention, memory-efficient, cuDNN's SDPA
MATMUL_WORDS = ("nvjet", "gemm", "cutlass", "cublas", "xmma", "matmul", "mm_")  # nvjet: Hopper's cuBLAS kernels
OPTIMIZER_WORDS = ("multi_tensor", "adam", "foreach")
TRITON_TEMPLATE = "triton_tem_"  # an Inductor GEMM template; triton_poi_/red_/per_ are fused elementwise


def kernel_category(name: str) -> str:
    """Where a GPU kernel's time goes: attention, matmul, optimizer, fused elementwise or other. A Triton
    kernel is a matmul only when it is a template (``triton_tem_``): a pointwise one named after the
    ``addmm`` it follows is elementwise; "cudnn" alone says nothing (cuDNN also converts layouts)."""
    low = name.lower()
    if any(w in low for w in ATTENTION_WORDS):
        return "attention"
    if low.startswith("triton_"):
        return "matmul" if low.startswith(TRITON_TEMPLATE) else "fused elementwise"
    if any(w in low for w in MATMUL_WORDS):
        return "matmul"
    if any(w in low for w in OPTIMIZER_WORDS):
        return "optimizer"
    return "other"


def seconds_by_category(events) -> dict[str, float]:
    """Device time per kernel category (summed durations: kernels on several streams count each)."""
    totals: dict[str, float] = {}
    for e in gpu_events(events):
        category = kernel_category(e.name)
        totals[category] = totals.get(category, 0.0) + (e.time_range.end - e.time_range.start) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def mode_config(
    name: str, device: torch.device, batch_size: int, epochs: int, out_dir: Path, tiny: bool, call: str
) -> Config:
    """Mode ``name``'s run of the call ``call``: its files are its own (a second call on the same ``out_dir``
    times a fresh run, not the first call's finished one), its kernel cache is ``out_dir``'s, shared by
    every call (``<checkpoint_dir>/compile_cache``)."""
    size = dict(dim=32, depth=2, heads=2) if tiny else {}
    logs = out_dir / "calls" / call
    return Config(batch_size=batch_size, epochs=epochs, device=str(device), run_name=f"bench_{name}_{call}",
                  checkpoint_dir=str(out_dir / "ck"), log_dir=str(logs / "log"), plot_dir=str(logs / "plots"),
                  **size, **MODES[name][0])  # fmt: skip


def unavailable(name: str, device: torch.device) -> str:
    """Why mode ``name`` cannot run as meant on ``device`` ("" when it can): a backend the card lacks, or
    autotune on a card too small for it (it would time the baseline under another name)."""
    from step import attention_unavailable, autotune_skipped

    fields = MODES[name][0]
    if fields.get("compile") and fields.get("cuda_graphs") and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if fields.get("autotune") and autotune_skipped(device):
        return autotune_skipped(device)
    return attention_unavailable(fields.get("attention", "auto"), device)


def bench_mode(
    name: str, device: torch.device, batch_size: int, epochs: int, out_dir: Path, tiny: bool, call: str
) -> dict:
    """One mode in this process (``--child``): its epochs, floor and GPU figures, with its config. Its
    checkpoints and lock are deleted after (hundreds of MB a run; the kernel cache stays for the next call)."""
    cfg = mode_config(name, device, batch_size, epochs, out_dir, tiny, call)
    try:
        with torch._inductor.config.patch(**MODES[name][1]):
            result = bench_epochs(
                device, cfg, epochs, warm=min(2, epochs - 1), images=TINY_IMAGES if tiny else EPOCH_IMAGES
            )
    finally:
        for leftover in [
            *Path(cfg.checkpoint_dir).glob(f"{cfg.name}_*.pth"),
            Path(cfg.checkpoint_dir) / f"{cfg.name}.lock",
        ]:
            leftover.unlink(missing_ok=True)
    return {**result, "inductor": MODES[name][1]}


def bench_train(
    device: torch.device,
    batch_size: int,
    epochs: int,
    out_dir: Path,
    tiny: bool = False,
    modes: Optional[list[str]] = None,
    on_result: Optional[Callable[[str, dict], None]] = None,
    variant_epochs: Optional[int] = None,
) -> dict:
    """The default configuration (or a tiny one for a CPU dry run) in each mode, each in a process of its
    own (its own Dynamo state: a variant cannot run another's graph, and one that falls back to eager
    leaves the others alone), sharing the kernel cache of ``out_dir``. The first mode is the baseline
    (``epochs``); the others (``variant_epochs``) are compared with it: the ratio of medians, and whether
    the variant beats the baseline by more than the baseline's own spread. ``on_result(mode, figures)``
    is called as each mode finishes (a cut-off run keeps what it measured)."""
    import subprocess

    modes = modes or (["graphs", "compile"] if device.type == "cuda" else ["eager"])
    call = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # this call's runs, apart from earlier calls'
    results: dict[str, dict] = {}
    for i, name in enumerate(modes):
        n = epochs if i == 0 else (variant_epochs or epochs)
        reason = unavailable(name, device)
        if reason:
            results[name] = {"skipped": reason}
        else:
            child_json = out_dir / "calls" / call / f"{name}.json"
            child_json.parent.mkdir(parents=True, exist_ok=True)
            args = [sys.executable, __file__, "train", "--child", name, "--epochs", str(n), "--batch-size",
                    str(batch_size), "--device", str(device), "--out", str(out_dir), "--call", call,
                    "--json", str(child_json)]  # fmt: skip
            try:
                done = subprocess.run(args + (["--tiny"] if tiny else []), capture_output=True, text=True)
            except KeyboardInterrupt:  # Ctrl-C, or the caller's time limit (timeout -s INT): the mode is cut
                results[name] = {"failed": ["cut off (interrupted: a time limit?)"]}
                results.update({m: {"failed": ["not run: cut off before it"]} for m in modes[i + 1 :]})
                if on_result is not None:
                    on_result(name, results[name])
                break
            if done.returncode == 0:
                results[name] = json.loads(child_json.read_text())
            else:
                results[name] = {"failed": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]}
        if i and "whole_epoch_s" in results[name] and "whole_epoch_s" in results[modes[0]]:
            base, mine = results[modes[0]]["whole_epoch_s"], results[name]["whole_epoch_s"]
            results[name]["over_baseline"] = mine["median"] / base["median"]
            results[name]["beats_baseline"] = mine["median"] < base["median"] - (base["p75"] - base["p25"])
        if on_result is not None:
            on_result(name, results[name])
    print_table(results, tiny, batch_size)
    return results


def print_table(results: dict, tiny: bool, batch_size: int) -> None:
    model = "tiny model (dim 32, depth 2)" if tiny else "default model (dim 384, depth 6, heads 6, DyT)"
    print(f"\n{model}, batch {batch_size}, seconds per 50k-image epoch (median [p25-p75]); first row: the baseline")
    cols = ["mode", "epochs", "compile", "whole epoch", "vs baseline", "train", "eval", "checkpoint", "model-only",
            "whole/model", "200 epochs", "busy", "kernels/step", "peak GiB"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")

    def s(d):
        return f"{d['median']:.2f} [{d['p25']:.2f}-{d['p75']:.2f}]"

    for name, r in results.items():
        if "whole_epoch_s" not in r:
            print(
                f"| {name} | {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + ' '.join(r['failed'])} |"
            )
            continue
        ratio = (
            f"{r['over_baseline']:.3f}x{' (beats it)' if r['beats_baseline'] else ''}" if "over_baseline" in r else "-"
        )
        print(
            f"| {name} ({r['compile_mode']}) | {r['config']['epochs']} | {r['compile_seconds']:.0f} s | "
            f"{s(r['whole_epoch_s'])} | {ratio} | {s(r['train_s'])} | {s(r['eval_s'])} | {s(r['checkpoint_s'])} | "
            f"{s(r['model_only_epoch_s'])} | {r['whole_over_model_only']:.2f} | {r['200_epochs_min']:.1f} min | "
            f"{r.get('gpu_busy_fraction', float('nan')):.0%} | {r.get('gpu_kernels_per_step', float('nan')):.0f} | "
            f"{r.get('peak_memory_gib', float('nan')):.2f} |"
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["aug", "train", "all"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=8, help="the baseline's epochs (the first 2 are warm-up)")
    ap.add_argument("--variant-epochs", type=int, help="each other mode's epochs (default: --epochs)")
    ap.add_argument("--out", type=Path, help="run folders and kernel cache (default: a temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one mode in this process, for bench_train
    ap.add_argument("--call", help=argparse.SUPPRESS)  # the child's call (bench_train): names its runs
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
    for flag, n in (("--epochs", args.epochs), ("--variant-epochs", args.variant_epochs)):
        if n is not None and n < 2:
            ap.error(f"{flag} must be 2 or more (the first epochs warm up, at least one is timed), got {n}")
    if args.child:  # one mode in this process: its figures to --json
        result = bench_mode(args.child, device, args.batch_size, args.epochs, args.out, args.tiny, args.call)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
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
            out = args.out or Path(tmp)  # a kept --out: a warm kernel cache for the next call
            results = bench_train(
                device, args.batch_size, args.epochs, out, args.tiny, modes, keep, args.variant_epochs
            )
        failed = [mode for mode, figures in results.items() if "failed" in figures]
        if failed:  # a mode that failed or was cut short: the command says so in its exit status
            sys.exit(f"benchmark: {', '.join(failed)} measured nothing (see the table's 'failed' rows)")


if __name__ == "__main__":
    main()
