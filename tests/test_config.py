"""The config: every field's rule, overrides from the notebook, the one norm-name-to-layer mapping."""

import dataclasses
import json

import pytest
import torch

from config import Config, config_differences, parse_overrides, with_overrides

BAD_VALUES = {
    "epochs": 0,
    "seed": -1,
    "run_name": "a/b",
    "data_dir": "",
    "download": "yes",
    "train_subset": -5,
    "test_subset": 1.5,
    "batch_size": 0,
    "eval_batch_size": -1,
    "cpu_threads": -1,
    "clean_train_images": -1,
    "crop_padding": -1,
    "hflip": 1,
    "randaugment": None,
    "randaug_ops": -1,
    "randaug_magnitude": 10.5,
    "randaug_magnitude_std": -0.1,
    "randaug_prob": 1.5,
    "mixup_alpha": -0.2,
    "cutmix_alpha": float("nan"),
    "label_smoothing": 1.0,
    "norm": "batchnorm",
    "alpha_init": 0.0,
    "alpha_lr_scale": 1.5,
    "dim": 0,
    "depth": 0,
    "heads": True,
    "patch_size": 0,
    "pool": "max",
    "attn_init": "xavier",
    "patch_embed_init": "kaiming",
    "verify_data": "yes",
    "mlp_ratio": -4.0,
    "drop_path": 1.0,
    "dropout": -0.5,
    "lr": 0.0,
    "min_lr": -1e-6,
    "weight_decay": -0.05,
    "warmup_epochs": -1.0,
    "ema_decay": 1.0,
    "grad_clip": -1.0,
    "amp": "fp8",
    "compile": "yes",
    "compile_cache": 1,
    "autotune": "yes",
    "attention": "xformers",
    "cuda_graphs": 1,
    "device": "gpu:x",
    "checkpoint_dir": "",
    "log_dir": 3,
    "plot_dir": None,
    "tensorboard": "on",
    "recipe": "cvt-7",
    "qkv_bias": 0,
    "block_style": "postnorm",
    "embed_init": "vit",
    "attn_dropout": 1.0,
    "warmup_lr": -1e-5,
    "cooldown_epochs": -1,
    "decay_embeddings": "yes",
    "mixup_switch_prob": 1.5,
    "mixup_off_epoch": -1,
    "resized_crop_scale": 1.5,
    "resized_crop_interpolation": "nearest",
    "random_erasing": -0.25,
    "randaug_op_set": "timm",
}


def test_every_config_field_has_an_invalid_value_test():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("field, value", list(BAD_VALUES.items()))
def test_invalid_config_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=100, heads=6), "divisible"),
        (dict(patch_size=5), "patch_size"),
        (dict(lr=1e-4, min_lr=1e-3), "min_lr"),
    ],
)
def test_invalid_combinations(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Config(**kwargs)


def test_defaults_are_the_design_configuration():
    cfg = Config()
    assert (cfg.batch_size, cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.mixup_alpha) == (256, 384, 6, 6, 4, 0.2)
    assert cfg.randaugment and cfg.epochs == 200 and cfg.norm == "dyt" and cfg.name == "dyt_cifar10"
    assert Config(norm="ln").name == "ln_cifar10" and Config(run_name="x").name == "x"
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown config field\(s\): .colour"):
        Config.from_dict({**cfg.to_dict(), "colour": 1})


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", 2**64),
        ("mlp_ratio", 0.001),
        ("crop_padding", 100),
        ("run_name", "my run"),
        ("run_name", "a\0b"),
        ("run_name", "a\\b"),
        ("run_name", ".hidden"),
        ("device", "mps"),
        ("device", "cuda:7"),
        ("device", "tpu"),
        ("patch_size", 64),
    ],
)
def test_values_that_used_to_fail_later_are_refused_at_config(field, value):
    with pytest.raises(ValueError, match=field if field != "mlp_ratio" else "mlp_ratio"):
        Config(**{field: value})


def test_good_edge_values_are_accepted():
    assert Config(seed=2**32 - 1, crop_padding=16, run_name="sweep_norm=ln_seed-1.v2", device="cpu").seed == 2**32 - 1


def test_overrides_from_a_dict_or_json_reach_the_config():
    base = Config()
    cfg = with_overrides(base, {"lr": 0.002, "run_name": "sweep1"})
    assert cfg.lr == 0.002 and cfg.name == "sweep1" and cfg.dim == base.dim
    assert with_overrides(base, '{"randaug_magnitude": 5, "pool": "gap"}').pool == "gap"
    assert with_overrides(base, "") == base and with_overrides(base, None) == base
    assert parse_overrides(json.dumps({"seed": 3})) == {"seed": 3}


def test_unknown_override_names_the_key_and_the_closest_field():
    with pytest.raises(ValueError, match="'randaug_magnitud'.*did you mean 'randaug_magnitude'"):
        with_overrides(Config(), {"randaug_magnitud": 5})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_overrides("{lr: 1}")
    with pytest.raises(ValueError, match="must be a dict"):
        parse_overrides("[1, 2]")
    with pytest.raises(ValueError, match="lr must be"):
        with_overrides(Config(), {"lr": -1})


def test_resumable_changes_are_not_differences():
    saved = Config().to_dict()
    assert config_differences(saved, Config(epochs=5, device="cpu", amp="off")) == {}
    assert config_differences(saved, Config(lr=2e-3)) == {"lr": (1e-3, 2e-3)}


def test_devices_that_exist_are_accepted():
    assert Config(device="cpu").device == "cpu"
    if torch.cuda.is_available():
        assert Config(device="cuda:0").device == "cuda:0"


def test_a_checkpoint_from_before_a_field_existed_resumes_at_that_fields_default():
    saved = Config().to_dict()
    del saved["ema_decay"], saved["pool"]  # written by an older version
    assert config_differences(saved, Config()) == {}
    assert config_differences(saved, Config(pool="gap")) == {"pool": ("cls", "gap")}


def test_the_docs_list_every_field_that_may_change_within_a_run():
    from pathlib import Path

    from config import RESUMABLE_CHANGES

    text = (Path(__file__).resolve().parent.parent / "docs" / "running.md").read_text()
    listed = text[text.index("Only these may change within a run") :].split("anything else is refused")[0]
    assert {f for f in RESUMABLE_CHANGES if f"`{f}`" not in listed} == set()
