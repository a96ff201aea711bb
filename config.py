"""The run's one typed config: every field with its default, unit and rule side by side.

``Config`` is validated once, when it is built (a bad value raises ``ValueError`` naming the field);
everything downstream trusts it. It is saved inside every checkpoint and next to the logs, and
``from_dict`` / ``to_dict`` round-trip it. ``overrides`` (the notebook's and the sweep's way to set
any field) live here too. It imports no model code: recipe.py turns the config into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

IMAGE_SIDE = 32  # CIFAR-10 images are 32x32
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding both accept it; the loader derives seeds from it
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,99}")  # file-name safe: no spaces, separators, NUL
NORM_NAMES = {"dyt": "DyT", "ln": "LayerNorm"}  # how each norm is spelled on screen


# --- rules: each returns None if the value is fine, else what it must be ----------------------


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: Optional[int] = None) -> Callable[[Any], Optional[str]]:
    def rule(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
        return None if ok else f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")

    return rule


def number(accepts: Callable[[float], bool], description: str) -> Callable[[Any], Optional[str]]:
    return lambda v: None if _is_number(v) and accepts(v) else f"a finite number {description}"


def one_of(*choices) -> Callable[[Any], Optional[str]]:
    return lambda v: None if isinstance(v, str) and v in choices else f"one of {choices}"


def boolean(v) -> Optional[str]:
    return None if isinstance(v, bool) else "True or False"


def optional_boolean(v) -> Optional[str]:
    return None if v is None or isinstance(v, bool) else "True, False or None (auto)"


def path(v) -> Optional[str]:
    return None if isinstance(v, str) and v and "\0" not in v else "a non-empty path string"


def run_name(v) -> Optional[str]:
    if isinstance(v, str) and (v == "" or RUN_NAME.fullmatch(v)):
        return None
    return '"" or 1-100 letters, digits and ._=+- (no spaces or path separators), starting with a letter or digit'


def device(v) -> Optional[str]:
    if v == "auto":
        return None
    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError):
        return "'auto' or a torch device string such as 'cuda', 'cuda:1', 'cpu'"
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            return f"an available device: this machine has {count} CUDA device(s); use 'auto' or 'cpu'"
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            return "an available device: MPS (Apple GPU) is not available here; use 'auto' or 'cpu'"
    elif dev.type != "cpu":
        return "'auto', 'cpu', 'cuda[:N]' or 'mps'"
    return None


def _field(default, rule, resumable: bool = False):
    """A config field with its rule; ``resumable``: it may change between a checkpoint and the config
    resuming it (where files live, how fast it runs, how long the run is). Any other change is another run."""
    return field(default=default, metadata={"rule": rule, "resumable": resumable})


@dataclass
class Config:
    """Everything a run depends on; the defaults are the recipe in the README (its table gives the
    source of each value): a ViT of dim 384, depth 6, heads 6, patch 4."""

    # --- run ---
    recipe: str = _field("default", lambda v: one_of(*RECIPES)(v))  # the preset the other fields came from (RECIPES)
    epochs: int = _field(
        200, integer(1), resumable=True
    )  # total epochs; raise it and re-run to train an existing run longer
    seed: int = _field(0, integer(0, MAX_SEED))  # model init, batch order, augmentation and mixup draws
    run_name: str = _field("", run_name)  # names checkpoints/logs/plots; "" -> f"{norm}_cifar10"
    # --- data ---
    data_dir: str = _field("./data", path, resumable=True)  # holds cifar-10-batches-py/ (downloaded there when missing)
    verify_data: bool = _field(True, boolean, resumable=True)  # check the batch files' published md5s when loading
    download: bool = _field(True, boolean, resumable=True)  # download CIFAR-10 with torchvision when data_dir lacks it
    train_subset: int = _field(0, integer(0))  # only the first N training images (0: all 50,000)
    test_subset: int = _field(0, integer(0))  # only the first N test images (0: all 10,000)
    batch_size: int = _field(256, integer(1, 50_000))  # training images per step
    eval_batch_size: int = _field(
        0, integer(0, 10_000), resumable=True
    )  # test images per forward pass (0: 250 on a CPU, 1000 on a GPU)
    clean_train_images: int = _field(2_000, integer(0), resumable=True)  # train images scored unaugmented (0: off)
    # --- augmentation ---
    crop_padding: int = _field(4, integer(0, IMAGE_SIDE // 2))  # random crop of the zero-padded image (0: off)
    resized_crop_scale: float = _field(0.0, number(lambda v: 0 <= v <= 1, "in [0, 1]"))  # >0: RandomResizedCrop
    resized_crop_interpolation: str = _field("bilinear", one_of("bilinear", "bicubic", "random"))  # its resize
    random_erasing: float = _field(0.0, number(lambda v: 0 <= v <= 1, "in [0, 1]"))  # timm's, mode "pixel"
    hflip: bool = _field(True, boolean)  # random horizontal flip
    randaugment: bool = _field(True, boolean)  # batched per-sample RandAugment (randomaug.py)
    randaug_ops: int = _field(2, integer(0, 10))  # RandAugment N: ops drawn per image
    randaug_magnitude: float = _field(9.0, number(lambda v: 0 <= v <= 10, "in [0, 10]"))  # M, randomaug.py's table
    randaug_magnitude_std: float = _field(0.5, number(lambda v: v >= 0, ">= 0"))  # per-image noise on M (mstd)
    randaug_op_set: str = _field("default", one_of("default", "timm-inc1"))  # randomaug.OP_SETS
    mixup_alpha: float = _field(0.2, number(lambda v: v >= 0, ">= 0"))  # Beta(a, a) mixup; 0: off
    cutmix_alpha: float = _field(
        0.0, number(lambda v: v >= 0, ">= 0")
    )  # Beta(a, a) CutMix; 0: off; with mixup: mixup_switch_prob of the batches
    mixup_switch_prob: float = _field(0.5, number(lambda v: 0 <= v <= 1, "in [0, 1]"))  # CutMix's share of batches
    mixup_off_epoch: int = _field(0, integer(0))  # epochs after this one train unmixed (timm's; 0: never off)
    randaug_prob: float = _field(
        1.0, number(lambda v: 0 <= v <= 1, "in [0, 1]")
    )  # chance each drawn op is applied (timm's p)
    label_smoothing: float = _field(0.1, number(lambda v: 0 <= v < 1, "in [0, 1)"))  # mass spread over all classes
    # --- model ---
    norm: str = _field("dyt", one_of(*NORM_NAMES))  # "dyt" (Dynamic Tanh) or "ln" (LayerNorm), in every norm slot
    alpha_init: float = _field(0.5, number(lambda v: v > 0, "> 0"))  # DyT's initial alpha (the paper's ViT value)
    alpha_lr_scale: float = _field(
        1.0, number(lambda v: 0 < v <= 1, "in (0, 1]")
    )  # DyT's alpha learns at lr x this (< 1: slower, so no alpha collapses to 0 early)
    dim: int = _field(384, integer(1))  # token width
    depth: int = _field(6, integer(1))  # transformer blocks
    heads: int = _field(6, integer(1))  # attention heads (must divide dim)
    patch_size: int = _field(4, integer(1, IMAGE_SIDE))  # 4 -> 8x8 = 64 tokens on 32x32 images
    mlp_ratio: float = _field(4.0, number(lambda v: v > 0, "> 0"))  # MLP hidden width / dim
    pool: str = _field("cls", one_of("cls", "gap", "seq"))  # head input: cls token, token mean, or sequence pooling
    attn_init: str = _field("default", one_of("default", "mimetic"))  # "mimetic": Trockman & Kolter 2023
    patch_embed_init: str = _field("trunc_normal", one_of("trunc_normal", "pytorch", "kaiming_normal"))  # models ViT
    qkv_bias: bool = _field(True, boolean)  # a bias on the query/key/value projections (Compact Transformers: none)
    block_style: str = _field("prenorm", one_of("prenorm", "cct"))  # "cct": the second norm on the residual stream
    embed_init: str = _field("timm", one_of("timm", "cct"))  # "cct": positional embedding std 0.2, cls token zeros
    attn_dropout: float = _field(0.0, number(lambda v: 0 <= v < 1, "in [0, 1)"))  # dropout on attention weights
    drop_path: float = _field(0.1, number(lambda v: 0 <= v < 1, "in [0, 1)"))  # stochastic depth of the last block
    dropout: float = _field(0.0, number(lambda v: 0 <= v < 1, "in [0, 1)"))  # embedding, attn projection, MLP
    # --- optimisation ---
    lr: float = _field(1e-3, number(lambda v: v > 0, "> 0"))  # peak learning rate after warmup (AdamW)
    min_lr: float = _field(1e-5, number(lambda v: v >= 0, ">= 0"))  # learning rate at the end of the cosine
    weight_decay: float = _field(0.05, number(lambda v: v >= 0, ">= 0"))  # decoupled, on weight matrices only
    warmup_epochs: float = _field(10.0, number(lambda v: v >= 0, ">= 0"))  # linear warmup (capped: recipe.warmup_steps)
    warmup_lr: float = _field(0.0, number(lambda v: v >= 0, ">= 0"))  # where the warmup starts (0: from lr / steps)
    cooldown_epochs: float = _field(
        0.0, number(lambda v: v >= 0, ">= 0")
    )  # at min_lr after the cosine, within epochs (capped)
    decay_embeddings: bool = _field(False, boolean)  # weight decay on the positional embedding and cls token too
    ema_decay: float = _field(0.0, number(lambda v: 0 <= v < 1, "in [0, 1) (0: off)"))  # EMA of weights per step
    grad_clip: float = _field(1.0, number(lambda v: v >= 0, ">= 0 (0: off)"))  # max global gradient norm
    amp: str = _field(
        "auto", one_of("auto", "bf16", "fp16", "off"), resumable=True
    )  # autocast dtype; "auto": see recipe.amp_dtype
    compile: Optional[bool] = _field(
        None, optional_boolean, resumable=True
    )  # torch.compile; None: on for CUDA, off elsewhere
    cuda_graphs: Optional[bool] = _field(
        None, optional_boolean, resumable=True
    )  # compiled steps as CUDA graphs; None: when compiling on CUDA
    autotune: bool = _field(False, boolean, resumable=True)  # compile with mode="max-autotune" (CUDA; minutes more)
    attention: str = _field("auto", one_of("auto", "flash", "cudnn", "efficient", "math"), resumable=True)  # SDPA
    compile_cache: bool = _field(True, boolean, resumable=True)  # kernels kept in <checkpoint_dir>/compile_cache
    device: str = _field("auto", device, resumable=True)  # "auto" (cuda > mps > cpu), or "cuda:1", "cpu", ...
    cpu_threads: int = _field(0, integer(0, 1024), resumable=True)  # torch threads on a CPU (0: torch's default)
    # --- outputs ---
    checkpoint_dir: str = _field("checkpoint", path, resumable=True)  # <run>_latest.pth (every epoch), <run>_best.pth
    log_dir: str = _field("log", path, resumable=True)  # <run>.csv, <run>.log, <run>_config.json
    plot_dir: str = _field("plots", path, resumable=True)  # <run>_training.png and the notebook's figures
    tensorboard: bool = _field(
        False, boolean, resumable=True
    )  # also <log_dir>/tb/<run> (needs: pip install tensorboard)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = f.metadata["rule"](value)
            if wanted:
                raise ValueError(f"{f.name} must be {wanted}, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if IMAGE_SIDE % self.patch_size:
            raise ValueError(f"patch_size must divide the image side {IMAGE_SIDE}, got {self.patch_size}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if round(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio ({self.mlp_ratio}) gives no MLP hidden unit at dim {self.dim}")

    @property
    def name(self) -> str:
        return self.run_name or f"{self.norm}_cifar10"

    @property
    def mlp_hidden(self) -> int:
        return round(self.dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        check_field_names(d)
        return cls(**d)


_dataclass_init = Config.__init__


def _init_from_preset(self, **given) -> None:
    """``Config(recipe=name, **fields)``: the preset's values for every field not given, so a preset named
    anywhere applies its values (a config built field by field, as ``from_dict`` of a saved config does,
    keeps what it is given). A label that holds none of its preset's own values is refused."""
    recipe = given.get("recipe", "default")
    preset = RECIPES.get(recipe, {}) if isinstance(recipe, str) else {}
    _dataclass_init(self, **{**preset, **given})
    own = {k: v for k, v in preset.items() if v != _DEFAULTS[k]}
    if own and all(getattr(self, k) == _DEFAULTS[k] for k in own):
        raise ValueError(
            f"this config is labelled recipe {recipe!r} but holds none of its {len(own)} own values (its "
            f"{', '.join(sorted(own)[:4])}, ... are all the default recipe's): build it with "
            f"recipe_config({recipe!r}, overrides), or leave recipe out"
        )


Config.__init__ = _init_from_preset


# Compact Transformers (Hassani et al. 2021, SHI-Labs/Compact-Transformers): configs/datasets/cifar10.yml and
# src/cvt.py, src/vit.py, src/utils/transformers.py, src/utils/tokenizer.py. docs/recipe.md gives each field
# with its source line, and what is not reproduced yet. The norm is left to the run (LayerNorm is published).
_COMPACT = dict(
    dim=256, depth=7, heads=4, mlp_ratio=2.0, patch_size=4, qkv_bias=False, block_style="cct", embed_init="cct",
    patch_embed_init="kaiming_normal", dropout=0.0, attn_dropout=0.1, drop_path=0.1, epochs=310, cooldown_epochs=10.0,
    batch_size=128, lr=5.5e-4, min_lr=1e-5, warmup_epochs=10.0, warmup_lr=1e-5, weight_decay=0.06,
    decay_embeddings=True, grad_clip=0.0, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0,
    mixup_switch_prob=0.5, mixup_off_epoch=175, randaug_ops=2, randaug_magnitude=9.0, randaug_magnitude_std=0.5,
    randaug_prob=0.5, randaug_op_set="timm-inc1", ema_decay=0.0, crop_padding=0, hflip=True, resized_crop_scale=0.8,
    resized_crop_interpolation="random", random_erasing=0.25,
)  # fmt: skip
RECIPES: dict[str, dict] = {
    "default": {},  # the README's recipe
    "vit-lite-7/4": {**_COMPACT, "pool": "cls"},  # 91.38% published (LayerNorm), 3.717 M parameters
    "cvt-7/4": {**_COMPACT, "pool": "seq"},  # 92.43% published (LayerNorm), 3.717 M parameters
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}  # the default recipe's values


def departures(cfg: Config) -> dict:
    """The fields in which ``cfg`` differs from its own preset: what was set on top of it."""
    preset = {**_DEFAULTS, **RECIPES[cfg.recipe]}
    return {k: v for k, v in cfg.to_dict().items() if k != "recipe" and v != preset[k]}


# The notebook's one-line CPU setting (docs/running.md, "On a CPU"): 59% in 6-8 minutes on a 2-core CPU.
CPU_SETTING = dict(dim=128, depth=4, heads=4, patch_size=8, epochs=10, batch_size=128, lr=0.003, randaugment=False,
                   mixup_alpha=0.0, drop_path=0.0)  # fmt: skip


def check_field_names(names) -> None:
    """Raise ``ValueError`` naming each unknown field and the closest real one."""
    known = [f.name for f in dataclasses.fields(Config)]
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(str(n), known, n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown config field(s): {', '.join(hints)}. The fields are: {', '.join(known)}")


def check_parameter_names(given, known) -> None:
    """Raise ``ValueError`` for each name in ``given`` (parameters a run was started with, e.g. papermill's
    ``-p``) that is not in ``known``, naming the closest known one: a misspelled parameter must stop the
    run, not leave it on a default (papermill itself only warns)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, sorted(known), n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown notebook parameter(s): {', '.join(hints)}. The parameters are: {', '.join(sorted(known))}; "
            f"any other Config field goes in overrides"
        )


def parse_overrides(overrides: dict | str | None) -> dict:
    """A dict of field -> value, or the same as a JSON string (papermill ``-p overrides '{...}'``)."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"overrides is not valid JSON ({e}): {overrides!r}") from e
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict (or a JSON object), got {type(overrides).__name__}")
    check_field_names(overrides)
    return dict(overrides)


def recipe_config(name: str, overrides: dict | str | None = None) -> Config:
    """The preset ``name`` (``RECIPES``) with ``overrides`` winning over it; the config records the name."""
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
        raise ValueError(
            f"unknown recipe {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; the recipes are: {', '.join(RECIPES)}"
        )  # fmt: skip
    overrides = parse_overrides(overrides)
    if overrides.get("recipe", name) != name:
        raise ValueError(
            f"the overrides name recipe {overrides['recipe']!r} while the preset is {name!r}: choose the preset with "
            f"the recipe parameter (the notebook), --recipe (python -m sweeps) or recipe_config(name), not in overrides"
        )
    return with_overrides({**Config().to_dict(), **RECIPES[name], "recipe": name}, overrides)


def with_overrides(base: Config | dict, overrides: dict | str | None, shared: dict | None = None) -> Config:
    """``base`` with the fields in ``overrides`` replaced, validated as a whole. A ``recipe`` in ``overrides``
    other than ``base``'s switches the preset: the new preset's values, then what ``base`` set on top of its
    own preset (``departures``) and the fields of ``shared`` (those set for every run, kept even where they
    equal the old preset's value), then the other overrides."""
    values = base.to_dict() if isinstance(base, Config) else dict(base)
    overrides = parse_overrides(overrides)
    recipe = overrides.get("recipe", values.get("recipe", "default"))
    if isinstance(base, Config) and recipe != base.recipe:
        carried = {**departures(base), **parse_overrides(shared)}
        carried.pop("recipe", None)
        values = recipe_config(recipe, carried).to_dict()
    values.update(overrides)
    return Config.from_dict(values)


# Fields that may differ between a checkpoint and the current config (``_field(..., resumable=True)``).
RESUMABLE_CHANGES = frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["resumable"])


def config_differences(saved: dict, current: Config) -> dict[str, tuple]:
    """Fields (other than ``RESUMABLE_CHANGES``) whose saved value differs: name -> (saved, current).

    A field the saved config lacks (written before the field existed) counts as its default, which
    is what that older code did, so an older run resumes as long as the new field keeps its default."""
    now = current.to_dict()
    defaults = Config().to_dict()
    saved = {**{n: v for n, v in defaults.items() if n not in saved}, **saved}
    names = (set(saved) | set(now)) - RESUMABLE_CHANGES
    return {
        n: (saved.get(n, "<missing>"), now.get(n, "<missing>"))
        for n in sorted(names)
        if saved.get(n, "<missing>") != now.get(n, "<missing>")
    }


OUTPUT_FOLDERS = {"checkpoint_dir": "checkpoint", "log_dir": "log", "plot_dir": "plots"}


def config_from_parameters(parameters: dict, overrides: dict | str | None = None, output_root=".") -> Config:
    """The notebook's config: the preset ``parameters["recipe"]`` (default ``"default"``), then the other
    ``parameters`` (Config fields by name, as the notebook's parameters cell sets them; one left at the
    default value keeps the preset's value), then ``overrides`` (any field; they win). An empty output
    folder becomes ``output_root/<checkpoint|log|plots>``."""
    check_field_names(parameters)
    parameters = dict(parameters)
    overrides = parse_overrides(overrides)
    recipe = parameters.pop("recipe", "default")
    if overrides.get("recipe", recipe) != recipe and recipe != "default":
        raise ValueError(
            f"the overrides name recipe {overrides['recipe']!r} while the recipe parameter is {recipe!r}: set the "
            f"preset in one place, the recipe parameter"
        )
    recipe = overrides.pop("recipe", recipe)
    base = recipe_config(recipe)
    defaults = Config().to_dict()
    values = {k: v for k, v in parameters.items() if k not in RECIPES[recipe] or v != defaults[k]}
    values.update(overrides)
    for key, folder in OUTPUT_FOLDERS.items():
        if not values.get(key):
            values[key] = str(Path(output_root) / folder)
    return with_overrides(base, values)


def parse_seeds(seeds: list | str | None) -> list[int]:
    """A list of seeds, or the same as a JSON string (papermill ``-p compare_seeds '[0, 1, 2]'``)."""
    if seeds is None or seeds == "":
        return []
    if isinstance(seeds, str):
        try:
            seeds = json.loads(seeds)
        except json.JSONDecodeError as e:
            raise ValueError(f"compare_seeds is not a JSON list ({e}): {seeds!r}; write it like [0, 1, 2]") from e
    rule = integer(0, MAX_SEED)
    if not isinstance(seeds, (list, tuple)) or any(rule(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"compare_seeds must be a list of distinct seeds (integers 0..{MAX_SEED}), got {seeds!r}")
    return list(seeds)
