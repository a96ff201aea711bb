"""At initialisation, on real CIFAR-10 test images: the tokens' size after the patch embedding and block
0's mean diagonal attention mass, for each norm, attention init and patch-embedding init (seed 0,
the default model otherwise). Uniform attention over 65 tokens has diagonal mass 1/65 = 0.015.

    python bench/init_scale.py DATA_DIR [--images 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Config  # noqa: E402
from data import load_cifar10, normalize  # noqa: E402
from models import diagonal_attention_mass, scale_mimetic_to_inputs_  # noqa: E402
from recipe import (
    MIMETIC_IMAGES,  # noqa: E402
    build_model,  # noqa: E402
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args(argv)
    data = load_cifar10(args.data_dir, download=False)
    images = normalize(data.x_test[: args.images])
    print("| norm | attn_init | patch_embed_init | token RMS | block 0 diagonal mass |")
    print("|---|---|---|---|---|")
    for norm in ("ln", "dyt"):
        for attn_init in ("default", "mimetic"):
            for patch_embed_init in ("trunc_normal", "pytorch"):
                torch.manual_seed(0)
                model = build_model(Config(norm=norm, attn_init=attn_init, patch_embed_init=patch_embed_init))
                if attn_init == "mimetic" and norm == "dyt":  # as training.Trainer does
                    scale_mimetic_to_inputs_(model, normalize(data.x_train[:MIMETIC_IMAGES]))
                with torch.no_grad():
                    rms = model.patch_embed(images).pow(2).mean().sqrt().item()
                mass = diagonal_attention_mass(model, images)
                print(f"| {norm} | {attn_init} | {patch_embed_init} | {rms:.3f} | {mass:.3f} |")


if __name__ == "__main__":
    main()
