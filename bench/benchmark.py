"""Speed and memory of the augmentation and of the training step, as ratios against a baseline
measured in the same run (these machines are shared and noisy).

    python bench/benchmark.py aug              # any machine: batched RandAugment vs torchvision per image
    python bench/benchmark.py train            # CUDA: full step vs model-only floor, memory, eval
    python bench/benchmark.py all --json out.json

Every figure is printed with the device, torch version and date it was taken on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Config  # noqa: E402
from data import CifarTensors  # noqa: E402
from randomaug import RandAugment  # noqa: E402
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


def model_only(trainer: Trainer, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps on one batch already on the device (the floor)."""
    x, y = next(iter(trainer.train_loader))
    x, targets = trainer.mixup.mix(x, y, 1.0)
    x, targets = x.clone(), targets.clone()

    def run():
        for _ in range(steps):
            trainer.train_step(x, targets)

    return timed(run, trainer.device, repeats=2)


def aug_only(trainer: Trainer) -> float:
    """Seconds for one epoch of batches (index, augment, mixup) without the model."""

    def run():
        for x, y in trainer.train_loader:
            trainer.mixup(x, y)

    return timed(run, trainer.device, repeats=2)


def bench_train(device: torch.device, batch_size: int, out_dir: Path) -> dict:
    """The seed configuration at ``batch_size``: full step vs model-only, compiled and eager."""
    data = synthetic_cifar(device)
    rows = {}
    for compiled in (True, False):
        cfg = Config(
            batch_size=batch_size,
            compile=compiled,
            device=str(device),
            checkpoint_dir=str(out_dir / "ck"),
            log_dir=str(out_dir / "log"),
            plot_dir=str(out_dir / "plots"),
        )
        tr = Trainer(cfg, data, show_progress=False, print_epochs=False)
        steps = tr.steps_per_epoch
        per_epoch = EPOCH_IMAGES / (steps * batch_size)  # seconds for 50k images per measured second
        t0 = time.perf_counter()
        tr.train_epoch()  # warm-up (compilation for the compiled trainer)
        tr.evaluate()
        warm = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats(device)
        full = min(tr.train_epoch()["train_seconds"], tr.train_epoch()["train_seconds"])
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        floor = model_only(tr, steps)
        aug = aug_only(tr)
        ev = timed(tr.evaluate, device, repeats=2)
        name = "compiled" if compiled else "eager"
        rows[name] = {
            "warmup_s": warm,
            "full_step_epoch_s": full * per_epoch,
            "full_step_images_per_s": steps * batch_size / full,
            "model_only_epoch_s": floor * per_epoch,
            "model_only_images_per_s": steps * batch_size / floor,
            "full_over_model_only": full / floor,
            "augmentation_epoch_s": aug * per_epoch,
            "augmentation_share_of_full_step": aug / full,
            "peak_memory_gib": peak,
            "eval_10k_s": ev * 10_000 / len(data.x_test),
        }
        del tr
        torch.cuda.empty_cache()
    print(
        f"\nseed configuration (dim 384, depth 6, heads 6, mlp 1536, DyT), batch {batch_size}, "
        f"seconds per 50k-image epoch:"
    )
    cols = [
        ("full step s/epoch", "full_step_epoch_s", "{:.2f}"),
        ("img/s", "full_step_images_per_s", "{:,.0f}"),
        ("model-only s/epoch", "model_only_epoch_s", "{:.2f}"),
        ("full/model", "full_over_model_only", "{:.3f}"),
        ("aug s/epoch", "augmentation_epoch_s", "{:.3f}"),
        ("aug share", "augmentation_share_of_full_step", "{:.1%}"),
        ("peak GiB", "peak_memory_gib", "{:.2f}"),
        ("eval 10k s", "eval_10k_s", "{:.3f}"),
        ("warm-up s", "warmup_s", "{:.0f}"),
    ]
    print("| mode | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(fmt.format(r[key]) for _, key, fmt in cols) + " |")
    return rows


def bench_train_cpu(batch_size: int, out_dir: Path) -> dict:
    """A dry run of the same measurements on CPU with a tiny model (checks the script, not the targets)."""
    data = synthetic_cifar(torch.device("cpu"), 2048, 512)
    cfg = Config(
        batch_size=batch_size,
        dim=32,
        depth=2,
        heads=2,
        device="cpu",
        checkpoint_dir=str(out_dir / "ck"),
        log_dir=str(out_dir / "log"),
        plot_dir=str(out_dir / "plots"),
    )
    tr = Trainer(cfg, data, show_progress=False, print_epochs=False)
    full = tr.train_epoch()["train_seconds"]
    floor = model_only(tr, tr.steps_per_epoch)
    aug = aug_only(tr)
    result = {"full_step_s": full, "model_only_s": floor, "augmentation_s": aug, "full_over_model_only": full / floor}
    print("CPU dry run (tiny model, 2048 images): " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["aug", "train", "all"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--aug-batches", type=int, default=20, help="batches of 256 for our RandAugment")
    ap.add_argument("--tv-images", type=int, default=2000, help="images for torchvision's per-image RandAugment")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    report = {"conditions": header(device)}
    if args.what in ("aug", "all"):
        report["aug"] = bench_aug(device, args.aug_batches, args.tv_images)
        if device.type == "cuda":
            report["aug_cpu"] = bench_aug(torch.device("cpu"), max(1, args.aug_batches // 10), args.tv_images)
    if args.what in ("train", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            if device.type == "cuda":
                report["train"] = bench_train(device, args.batch_size, Path(tmp))
            else:
                report["train_cpu_dry_run"] = bench_train_cpu(64, Path(tmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
