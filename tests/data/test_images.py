"""Image data: idx reading (and its errors), Fashion-MNIST, image folders, normalisation, augmentation."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from outlierfree.data import images as I
from outlierfree.errors import OutlierfreeError


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_read_idx_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, gz=False)
    assert np.array_equal(I.read_idx(tmp_path / "a.gz"), a) and np.array_equal(I.read_idx(tmp_path / "a"), a)


@pytest.mark.parametrize("damage", ["truncated", "cut_gzip", "bad_magic", "not_gzip", "missing"])
def test_bad_idx_files_are_one_line_errors(tmp_path, damage):
    a = np.zeros((10, 28, 28), dtype=np.uint8)
    p = tmp_path / "x-idx3-ubyte.gz"
    write_idx(p, a)
    raw = p.read_bytes()
    if damage == "truncated":
        write_idx(p, a)
        data = gzip.decompress(raw)[:-100]
        p.write_bytes(gzip.compress(data))
    elif damage == "cut_gzip":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "bad_magic":
        p.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + gzip.decompress(raw)[4:]))
    elif damage == "not_gzip":
        p.write_bytes(b"hello, not gzip at all")
    else:
        p.unlink()
    with pytest.raises(OutlierfreeError) as e:
        I.read_idx(p)
    msg = str(e.value)
    assert "\n" not in msg and "; " in msg
    if damage == "missing":
        assert "apt-get install dataset-fashion-mnist" in msg
    if damage == "truncated":
        assert "truncated" in msg


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(OutlierfreeError, match="apt-get install dataset-fashion-mnist"):
        I.load_fashion_mnist(tmp_path / "absent")
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(OutlierfreeError, match="train-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        I.load_fashion_mnist(tmp_path / "partial")


@pytest.mark.skipif(not os.path.isdir(I.FASHION_MNIST_DIR), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_files():
    d = I.load_fashion_mnist()
    assert tuple(d.train_x.shape) == (60000, 1, 28, 28) and tuple(d.val_x.shape) == (10000, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and int(d.train_y.max()) == 9
    assert torch.bincount(d.train_y).tolist() == [6000] * 10  # the dataset's known class balance
    x = d.train_x[:5000].double() / 255
    assert x.mean().item() == pytest.approx(d.mean[0], abs=0.01) and x.std().item() == pytest.approx(d.std[0], abs=0.01)


def test_normalise_against_float64():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(I.normalise(x, mean, std).double(), ref, atol=1e-6)


def test_augment_matches_a_reference_crop_and_flip():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float64).view(2, 3, 6, 6) + 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = I.augment(x, g1, pad=2)
    dy = torch.randint(0, 5, (2,), generator=g2)
    dx = torch.randint(0, 5, (2,), generator=g2)
    flip = torch.rand(2, generator=g2) < 0.5
    for b in range(2):
        padded = np.pad(x[b].numpy(), ((0, 0), (2, 2), (2, 2)))
        ref = padded[:, dy[b]: dy[b] + 6, dx[b]: dx[b] + 6]
        if flip[b]:
            ref = ref[:, :, ::-1]
        assert np.array_equal(out[b].numpy(), ref)
    again = I.augment(x, torch.Generator().manual_seed(5), pad=2)
    assert torch.equal(out, again)
    # over many draws every shift and both flips occur
    g = torch.Generator().manual_seed(0)
    one = torch.zeros(1, 1, 6, 6)
    one[0, 0, 2, 1] = 1
    seen = {tuple(torch.nonzero(I.augment(one, g, pad=2)[0, 0]).flatten().tolist()) for _ in range(400)}
    assert len(seen) > 20


def test_image_folder_split_and_channels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, value in (("cats", 30), ("dogs", 220)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            a = np.full((10, 12, 3), value, dtype=np.uint8) + rng.integers(0, 5, (10, 12, 3)).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "cats" / "notes.txt").write_text("ignored")
    d = I.load_image_folder(tmp_path / "imgs", image_size=8, val_fraction=0.25)
    assert d.classes == ["cats", "dogs"] and d.channels == 3 and d.image_size == 8
    assert len(d.train_y) + len(d.val_y) == 24 and 0 < len(d.val_y) < 12
    assert set(d.train_y.tolist()) == {0, 1}
    # the class is visible in the pixels: dogs are bright
    assert (d.train_x[d.train_y == 1].float().mean() > 200) and (d.train_x[d.train_y == 0].float().mean() < 40)
    again = I.load_image_folder(tmp_path / "imgs", image_size=8, val_fraction=0.25)
    assert torch.equal(again.val_y, d.val_y)  # the split is a fixed function of the file names


def test_image_folder_errors(tmp_path):
    with pytest.raises(OutlierfreeError, match="does not exist"):
        I.load_images(str(tmp_path / "none"), 28)
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(OutlierfreeError, match="at least two class subfolders"):
        I.load_images(str(tmp_path / "one"), 28)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "b").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "b" / "y.png").write_bytes(b"not a png")
    with pytest.raises(OutlierfreeError, match="cannot read the image|cannot identify"):
        I.load_images(str(tmp_path / "bad"), 28)
