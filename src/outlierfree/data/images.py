"""Image data for ViT pre-training: Fashion-MNIST from its idx files, or a folder of images in class subfolders.

Images are kept as uint8 tensors (N, C, H, W) and turned into normalised float batches on the fly, with the
standard light augmentation (random crop after zero padding, random horizontal flip) done in torch with an explicit
generator, so a batch is a deterministic function of (seed, step). torchvision is not used (it does not work in
this environment).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import OutlierfreeError, require

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte", "val_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# per-channel mean and std of the Fashion-MNIST training images (pixel values in [0, 1])
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`, or pass --data DIR holding the idx files"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain): magic ``0 0 dtype ndim``, big-endian dims, then the data.
    A truncated or corrupt file is a one-line error."""
    p = Path(path)
    try:
        raw = gzip.open(p, "rb").read() if p.suffix == ".gz" else p.read_bytes()
    except FileNotFoundError as e:
        raise OutlierfreeError(f"the idx file {str(p)!r} does not exist", INSTALL_HINT) from e
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut .gz raises EOFError
        raise OutlierfreeError(f"the idx file {str(p)!r} is corrupt or truncated ({e})",
                               "re-download or reinstall it (apt-get install --reinstall dataset-fashion-mnist)") from e
    bad = OutlierfreeError(f"{str(p)!r} is not a valid idx file (bad header)", "pass an idx file such as "
                           "train-images-idx3-ubyte.gz (reinstall with apt-get install dataset-fashion-mnist)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise bad
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise bad
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    have = len(raw) - 4 - 4 * ndim
    if have != need:
        raise OutlierfreeError(f"the idx file {str(p)!r} is truncated or corrupt: {have} data bytes for shape "
                               f"{tuple(dims)} ({need} expected)", "re-download or reinstall it "
                               "(apt-get install --reinstall dataset-fashion-mnist)")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise OutlierfreeError(f"Fashion-MNIST file {stem}(.gz) not found in {str(root)!r}", INSTALL_HINT)


@dataclass
class ImageData:
    """uint8 images (N, C, H, W) with int64 labels, and how to normalise them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        """Height (= width) of the images."""
        return int(self.train_x.shape[2])


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST (60k train, 10k test used as validation) from the idx files in ``root``
    (default ``$OUTLIERFREE_FASHION_MNIST`` or /usr/share/datasets/fashion-mnist)."""
    root = Path(root or os.environ.get("OUTLIERFREE_FASHION_MNIST") or FASHION_MNIST_DIR)
    require(root.is_dir(), f"the Fashion-MNIST folder {str(root)!r} does not exist", INSTALL_HINT)
    arrays = {k: read_idx(_find_idx(root, stem)) for k, stem in FASHION_MNIST_FILES.items()}
    for split in ("train", "val"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        require(x.ndim == 3 and y.ndim == 1 and len(x) == len(y), f"Fashion-MNIST {split} images {x.shape} and labels "
                f"{y.shape} do not match", "reinstall it (apt-get install --reinstall dataset-fashion-mnist)")
        require(len(y) == 0 or int(y.max()) < 10, f"Fashion-MNIST {split} labels go beyond 9",
                "reinstall it (apt-get install --reinstall dataset-fashion-mnist)")

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))[:, None]  # (N, 1, 28, 28)

    return ImageData(t(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                     t(arrays["val_images"]), torch.from_numpy(arrays["val_labels"].astype(np.int64)),
                     list(FASHION_MNIST_CLASSES), FASHION_MNIST_MEAN, FASHION_MNIST_STD, f"fashion-mnist:{root}")


def is_idx_folder(path: Path) -> bool:
    """Whether ``path`` holds Fashion-MNIST-style idx files."""
    return path.is_dir() and any(path.glob("*-idx3-ubyte*"))


def _image_mode(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise OutlierfreeError(f"cannot read the image {str(path)!r} ({e})", "remove or replace the file") from e


def _open_image(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise OutlierfreeError(f"cannot read the image {str(path)!r} ({e})", "remove or replace the file") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)


def load_image_folder(path: str | os.PathLike, image_size: int, val_fraction: float = 0.1,
                      channels: int | None = None) -> ImageData:
    """Images in class subfolders (``root/<class>/*.png``), resized to ``image_size``. If ``root`` has ``train/``
    and ``val/`` (or ``validation/``, ``test/``) subfolders they are the split; otherwise a fixed hash of each file's
    relative path puts ``val_fraction`` of them in validation. ``channels`` 1 (grey) or 3 (RGB); default: 1 if every
    sampled image is greyscale, else 3. Mean and std are measured on the training images."""

    root = Path(path).expanduser()
    require(root.exists(), f"the data path {str(path)!r} does not exist", "pass a folder of class subfolders of images")
    require(root.is_dir(), f"{str(path)!r} is not a folder", "pass a folder of class subfolders of images")
    split_dirs = {s: root / s for s in ("train", "val", "validation", "test") if (root / s).is_dir()}
    if "train" in split_dirs and len(split_dirs) > 1:
        val_dir = split_dirs.get("val") or split_dirs.get("validation") or split_dirs["test"]
        train_files, classes = _class_files(split_dirs["train"])
        val_files, _ = _class_files(val_dir, classes)
    else:
        files, classes = _class_files(root)
        cut = int(val_fraction * 2**32)
        train_files, val_files = [], []
        for f, c in files:
            h = int.from_bytes(hashlib.blake2b(str(f.relative_to(root)).encode(), digest_size=4).digest(), "little")
            (val_files if h < cut else train_files).append((f, c))
    require(train_files, f"no training images in {str(path)!r}", "put images in class subfolders (root/<class>/x.png)")
    if channels is None:
        modes = set()
        for f, _ in train_files[:: max(1, len(train_files) // 64)]:
            modes.add(_image_mode(f))
        channels = 1 if modes <= {"L", "1", "I;16", "I"} else 3
    mode = "L" if channels == 1 else "RGB"

    def load(items: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not items:
            return torch.zeros(0, channels, image_size, image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        x = np.stack([_open_image(f, image_size, mode) for f, _ in items])  # (N, C, H, W)
        return torch.from_numpy(x), torch.tensor([c for _, c in items], dtype=torch.long)

    tx, ty = load(train_files)
    vx, vy = load(val_files)
    xf = tx.float() / 255
    mean = tuple(float(v) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in xf.std(dim=(0, 2, 3)))
    return ImageData(tx, ty, vx, vy, classes, mean, std, f"folder:{root}")


def _class_files(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    require(len(classes) >= 2, f"{str(root)!r} needs at least two class subfolders (found {len(found)})",
            "arrange images as root/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}
    files = []
    for c in found:
        require(c in index, f"class folder {c!r} in {str(root)!r} is not a training class",
                "use the same class folders in train/ and val/")
        files += [(f, index[c]) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTS]
    return files, classes


def load_images(data: str | None, image_size: int, val_fraction: float = 0.1, channels: int | None = None) -> ImageData:
    """Fashion-MNIST (``data`` None, ``fashion-mnist`` or a folder of idx files) or an image folder."""
    if data is None or data == "fashion-mnist":
        return load_fashion_mnist()
    p = Path(data).expanduser()
    if is_idx_folder(p):
        return load_fashion_mnist(p)
    return load_image_folder(p, image_size, val_fraction, channels)


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x/255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels and random horizontal flip, per image.
    x: (B, C, H, W) (any dtype); deterministic given ``generator``."""
    B, C, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zero = black border (before normalising)
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
        rows = (dy[:, None] + torch.arange(H)[None])  # (B, H)
        cols = (dx[:, None] + torch.arange(W)[None])  # (B, W)
        x = xp[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
    if flip:
        f = torch.rand(B, generator=generator) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x
