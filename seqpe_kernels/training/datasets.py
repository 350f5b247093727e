"""The training data of ``seqpe-kernels train``: bytes of a text file (the LM; by default the embedded synthetic
corpus in ``training/data/``), an image folder, or the built-in synthetic image task whose label needs position
information (the ViT)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

class TextData:
    """Byte-level tokens of a UTF-8 text; the last 10 % is held out for evaluation."""

    def __init__(self, path: Optional[str]):
        if path is None:
            from .data.corpus import CHRONICLE_PATH

            path, self.name = CHRONICLE_PATH, "embedded synthetic chronicle (seqpe_kernels/training/data/chronicle.txt)"
        else:
            self.name = path
        with open(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {path}: not a UTF-8 text file ({e})") from None
        tokens = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        split = int(len(tokens) * 0.9)
        self.train, self.eval = tokens[:split], tokens[split:]

    def batch(self, rng: np.random.Generator, n: int, length: int) -> torch.Tensor:
        if len(self.train) < length + 1:
            raise ValueError(f"the training text ({len(self.train)} bytes) is shorter than one block ({length})")
        starts = rng.integers(0, len(self.train) - length + 1, size=n)
        return torch.from_numpy(np.stack([self.train[s:s + length] for s in starts]))


_PAIRS = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # red / green
                   [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]])  # blue / yellow
SYNTHETIC_CLASSES = 8
SYNTHETIC_SIDES = ("left", "right", "top", "bottom")


def synthetic_images(rng: np.random.Generator, n: int, grid: int, patch: int,
                     noise: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The built-in ViT task: ``n`` images [n, 3, grid*patch, grid*patch] and labels [n] in 0..7.

    Each image is split by a straight boundary along patch borders (vertical or horizontal, at a random cell
    1..grid-1) into two flat colour regions from one of two colour pairs (red/green or blue/yellow), plus
    Gaussian pixel noise. ``label = 4 * pair + side``, side = where the pair's first colour lies: 0 left, 1
    right, 2 top, 3 bottom. The pair is plain content (learnt within a few dozen steps, so the loss falls
    fast); the side needs positions: every patch is one flat colour and, over the random boundary, each side
    shows the same bag of patches, so a position-blind model tops out at 0.25 accuracy (chance 0.125). The
    rule is the same at every grid size, so accuracy on larger grids measures PE extrapolation.
    """
    if grid < 2:
        raise ValueError("the synthetic task needs a patch grid of at least 2 x 2")
    S = grid * patch
    side = rng.integers(0, 4, n)
    pair = rng.integers(0, 2, n)
    cut = rng.integers(1, grid, n)
    idx = np.arange(grid)
    coord = np.where((side < 2)[:, None, None], idx[None, None, :], idx[None, :, None])  # column or row index
    first = (coord < cut[:, None, None]) ^ (side % 2 == 1)[:, None, None]  # [n, grid, grid]
    cells = np.where(first[:, None], _PAIRS[pair, 0][:, :, None, None], _PAIRS[pair, 1][:, :, None, None])
    img = np.repeat(np.repeat(cells, patch, axis=2), patch, axis=3) + noise * rng.standard_normal((n, 3, S, S))
    labels = 4 * pair + side
    return torch.from_numpy((img - 0.5).astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


class MissingDependency(RuntimeError):
    """An optional package a requested feature needs is not installed."""


_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolderData:
    """``root/<class>/<image>``; every 10th image of a class (if it has >= 2) is held out for evaluation."""

    def __init__(self, root: str, img_size: int):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise MissingDependency("--data with --task vit reads an image folder with Pillow, which is not installed "
                               "(pip install pillow); without --data the built-in synthetic task needs "
                               "nothing") from None
        if not os.path.isdir(root):
            raise ValueError(f"--data {root}: not a directory (expected one subfolder per class)")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if len(self.classes) < 2:
            raise ValueError(f"--data {root}: needs at least two class subfolders, found {len(self.classes)}")
        self.train_files, self.eval_files = [], []
        for ci, c in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(_IMG_EXT))
            if not files:
                raise ValueError(f"--data {root}: class folder {c!r} has no images ({', '.join(_IMG_EXT)})")
            held = {i for i in range(len(files)) if i % 10 == 9} or ({len(files) - 1} if len(files) >= 2 else set())
            for i, f in enumerate(files):
                (self.eval_files if i in held else self.train_files).append((os.path.join(root, c, f), ci))
        self.name = root
        self.num_classes = len(self.classes)
        self.train_x, self.train_y = self.load(self.train_files, img_size)

    @staticmethod
    def load(files, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        xs = []
        for path, _ in files:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                xs.append(np.asarray(im, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous() - 0.5
        return x, torch.tensor([c for _, c in files], dtype=torch.long)

    def batch(self, rng: np.random.Generator, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(rng.integers(0, len(self.train_y), size=n))
        return self.train_x[idx], self.train_y[idx]


