"""CIFAR-10 loading from the real on-disk layout, the device loader, crop/flip, mixup and CutMix."""

import pickle
import urllib.error

import numpy as np
import pytest
import torch

import data
from data import (
    BATCH_FOLDER,
    CorruptDatasetError,
    DatasetNotFoundError,
    DeviceLoader,
    Mixup,
    TrainAugment,
    crop_flip,
    draw_crop_flip,
    load_cifar10,
    normalize,
)
from randomaug import RandAugment


def test_loads_batches_as_uint8_nchw(fake_cifar):
    d = load_cifar10(fake_cifar, download=False, verify=False)
    assert d.x_train.shape == (200, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.y_train.shape == (200,) and d.y_train.dtype == torch.int64
    assert d.x_test.shape == (50, 3, 32, 32) and d.y_test.shape == (50,)
    with open(fake_cifar / BATCH_FOLDER / "data_batch_2", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    # Image 45 is the 6th of batch 2: rows are channel-major 3x1024.
    assert np.array_equal(d.x_train[45].numpy(), entry["data"][5].reshape(3, 32, 32))
    assert d.y_train[45].item() == entry["labels"][5]


def test_subsets_keep_the_first_images(fake_cifar):
    full = load_cifar10(fake_cifar, download=False, verify=False)
    d = load_cifar10(fake_cifar, download=False, train_subset=70, test_subset=9, verify=False)
    assert len(d.x_train) == 70 and len(d.x_test) == 9
    assert torch.equal(d.x_train, full.x_train[:70]) and torch.equal(d.y_test, full.y_test[:9])


def test_missing_data_without_network_names_folder_and_fix(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-python.tar.gz" in msg and BATCH_FOLDER in msg
    assert "no network" in msg


def test_missing_data_with_download_off_does_not_try(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def fail(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(tvu, "download_and_extract_archive", fail)
    with pytest.raises(DatasetNotFoundError, match="download=off"):
        load_cifar10(tmp_path, download=False)


def test_bad_archive_is_reported(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half an archive")
    with pytest.raises(CorruptDatasetError, match="md5"):
        load_cifar10(tmp_path)


def test_truncated_batch_names_the_file(fake_cifar):
    path = fake_cifar / BATCH_FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptDatasetError, match="data_batch_3"):
        load_cifar10(fake_cifar, download=False, verify=False)


def test_wrong_content_is_reported(fake_cifar):
    path = fake_cifar / BATCH_FOLDER / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(CorruptDatasetError, match="test_batch.*3072"):
        load_cifar10(fake_cifar, download=False, verify=False)


def _indexed(n):
    """Images whose label is their index, so batches reveal which images they hold."""
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n)


def test_every_training_index_once_per_epoch():
    x, y = _indexed(200)
    loader = DeviceLoader(x, y, batch_size=50, train=True, seed=3)
    epochs = [torch.cat([yb for _, yb in loader]) for _ in range(2)]
    for order in epochs:
        assert torch.equal(order.sort().values, torch.arange(200))
    assert not torch.equal(epochs[0], epochs[1])  # a new permutation each epoch


def test_training_drops_incomplete_batch_and_eval_keeps_it():
    x, y = _indexed(130)
    train = DeviceLoader(x, y, batch_size=50, train=True)
    assert len(train) == 2 and all(len(yb) == 50 for _, yb in train)
    test = DeviceLoader(x, y, batch_size=50, train=False)
    batches = list(test)
    assert len(test) == 3 and [len(b[1]) for b in batches] == [50, 50, 30]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert torch.allclose(batches[2][0], normalize(x[100:]))  # test batches: normalised only


def test_loader_state_restores_the_next_epoch():
    x, y = _indexed(100)
    a = DeviceLoader(x, y, batch_size=20, train=True, seed=1, augment=TrainAugment(4, True, RandAugment()))
    list(a)
    state = a.state_dict()
    first = [(xb.clone(), yb.clone()) for xb, yb in a]
    b = DeviceLoader(x, y, batch_size=20, train=True, seed=99, augment=TrainAugment(4, True, RandAugment()))
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(first, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_loader_rejects_too_few_images():
    x, y = _indexed(10)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(x, y, batch_size=32, train=True)


def random_crop_flip(x, padding, flip, generator=None):
    return crop_flip(x, padding, *draw_crop_flip(x.shape[0], padding, flip, x.device, generator))


def test_crop_flip_outputs_are_windows_of_the_padded_image():
    x, _ = _indexed(16)
    out = random_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for i in range(len(x)):
        matches = [
            (dy, dx, flipped)
            for dy in range(9)
            for dx in range(9)
            for flipped in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, dy : dy + 32, dx : dx + 32].flip(-1)
                if flipped
                else padded[i, :, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert len(matches) == 1, f"sample {i} is not exactly one crop of its padded image"
        found += matches
    assert len({(dy, dx) for dy, dx, _ in found}) > 8  # offsets differ per sample
    assert 0 < sum(f for _, _, f in found) < len(x)  # some flipped, some not


def test_crop_flip_off_is_identity():
    x, _ = _indexed(4)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_train_augment_normalises():
    x, _ = _indexed(64)
    out = TrainAugment(4, True, RandAugment())(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
    plain = TrainAugment(0, False, None)(x)
    assert torch.allclose(plain, normalize(x))
    expected = (x[0, 1].float() / 255 - data.CIFAR10_MEAN[1]) / data.CIFAR10_STD[1]
    assert torch.allclose(plain[0, 1], expected, atol=1e-5)


def test_mixup_targets_sum_to_one_and_pair_with_mirror():
    x = torch.randn(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    mix = Mixup(mixup_alpha=0.2, label_smoothing=0.1, num_classes=10)
    xm, t = mix.mix(x, y, lam=0.3)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    torch.testing.assert_close(xm, 0.3 * x + 0.7 * x.flip(0))
    # sample 0 is 0.3 of class 0 and 0.7 of class 5 (its mirror), each smoothed: 0.01 + 0.9 * share
    assert t[0, 0].item() == pytest.approx(0.01 + 0.9 * 0.3) and t[0, 5].item() == pytest.approx(0.01 + 0.9 * 0.7)
    assert t[0, 3].item() == pytest.approx(0.01)


def test_mixup_at_lambda_one_is_one_hot():
    x = torch.randn(4, 3, 4, 4)
    y = torch.tensor([3, 1, 4, 1])
    xm, t = Mixup(label_smoothing=0.0).mix(x, y, lam=1.0)
    assert torch.equal(xm, x) and torch.equal(t, torch.nn.functional.one_hot(y, 10).float())


def test_mixup_off_gives_smoothed_labels():
    x = torch.randn(4, 3, 4, 4)
    y = torch.tensor([3, 1, 4, 1])
    xm, t = Mixup(mixup_alpha=0.0, label_smoothing=0.2)(x, y)
    assert torch.equal(xm, x) and t[0, 3].item() == pytest.approx(0.82) and t[0, 0].item() == pytest.approx(0.02)


def test_cutmix_pastes_box_and_weights_by_area():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    y = torch.tensor([0, 1])
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, seed=4)
    lam, box = mix.draw(8, 8)
    y0, y1, x0, x1 = box
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 64)
    xm, t = mix.mix(x, y, lam, box)
    assert torch.equal(xm[0, :, y0:y1, x0:x1], x[1, :, y0:y1, x0:x1])
    assert (xm[0] == x[0]).sum() == 64 - (y1 - y0) * (x1 - x0)
    torch.testing.assert_close(t[0], torch.tensor([lam, 1 - lam] + [0.0] * 8))


def test_mixup_lambdas_follow_beta_and_state_restores():
    mix = Mixup(mixup_alpha=0.2, seed=0)
    lams = [mix.draw(32, 32)[0] for _ in range(2000)]
    assert 0.45 < np.mean(lams) < 0.55 and np.mean([min(v, 1 - v) < 0.1 for v in lams]) > 0.5  # U-shaped
    state = mix.state_dict()
    after = [mix.draw(32, 32)[0] for _ in range(5)]
    other = Mixup(mixup_alpha=0.2, seed=123)
    other.load_state_dict(state)
    assert [other.draw(32, 32)[0] for _ in range(5)] == after


def test_augment_transform_traces_as_one_graph():
    # TrainAugment(compile=True) compiles `transform`: it must have no graph breaks.
    torch._dynamo.reset()
    aug = TrainAugment(4, True, RandAugment())
    x, _ = _indexed(8)
    params = aug.draw(x, torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(aug.transform)(x, **params)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_augment_is_draw_then_transform():
    aug = TrainAugment(4, True, RandAugment())
    x, _ = _indexed(8)
    params = aug.draw(x, torch.Generator().manual_seed(0))
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), aug.transform(x, **params))
