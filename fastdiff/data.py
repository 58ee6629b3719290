"""Training data: scikit-learn's bundled handwritten digits, or a folder of images.

Both give float32 images in [-1, 1], (N, C, R, R), and optional integer class labels. The digits
(1797 images of 8x8, values 0..16, ten classes) ship with scikit-learn: nothing is downloaded.
A folder is read with Pillow, one image per file; with class labels, each sub-folder of the root
is a class (sorted names). Images are decoded when a batch asks for them, so a folder need not
fit in memory; the folder is scanned (headers only) once, up front, so that an unreadable file or
mixed sizes is an error before training starts, not after an hour.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageData:
    """len(data) images; `data.images(idx)` -> float32 (len(idx), C, R, R) in [-1, 1];
    `data.labels` -> int64 (N,) or None; `class_names`, `channels`, `resolution`."""

    def __init__(self, name: str, channels: int, resolution: int, labels: Optional[torch.Tensor],
                 class_names: Optional[list]):
        self.name, self.channels, self.resolution = name, channels, resolution
        self.labels, self.class_names = labels, class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def __len__(self) -> int:
        raise NotImplementedError

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DigitsData(ImageData):
    """scikit-learn's load_digits: 8x8 grayscale, values 0..16, resized (bilinear) to resolution."""

    def __init__(self, resolution: Optional[int] = None):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("--data digits needs scikit-learn (pip install scikit-learn): its "
                              "bundled digits data set is the source") from e
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
        resolution = 8 if resolution is None else resolution
        if resolution != 8:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                              align_corners=False).clamp_(-1.0, 1.0)
        self._x = x.contiguous()
        super().__init__("digits", 1, resolution, torch.tensor(d.target, dtype=torch.int64),
                         [str(i) for i in range(10)])

    def __len__(self):
        return self._x.shape[0]

    def images(self, idx):
        return self._x[idx]


class FolderData(ImageData):
    """Every image file under `root` (recursively). With class_labels, each direct sub-folder of
    root is a class and files directly in root are an error. Resized so the shorter side is
    `resolution`, then center-cropped square; without resolution every image must be square and
    of one size. Grayscale when every file is, else RGB."""

    def __init__(self, root: str, resolution: Optional[int] = None, class_labels: bool = False):
        from PIL import Image, UnidentifiedImageError
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist (or is not a folder); "
                                    "--data takes 'digits' or a folder of images")
        if class_labels:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir()
                             and not e.name.startswith("."))
            loose = [e.name for e in os.scandir(root) if e.is_file()
                     and e.name.lower().endswith(IMAGE_EXTENSIONS)]
            if loose:
                raise ValueError(f"class labels come from the sub-folders of {root!r}, but it holds "
                                 f"images directly ({loose[0]!r}, ...): put every image in a "
                                 "sub-folder named by its class, or train without "
                                 "--class-conditional")
            if not classes:
                raise ValueError(f"class labels come from the sub-folders of {root!r}, and it has "
                                 "none")
        else:
            classes = [""]
        files, labels = [], []
        for c, name in enumerate(classes):
            found = _image_files(os.path.join(root, name))
            if class_labels and not found:
                raise ValueError(f"class folder {os.path.join(root, name)!r} holds no images "
                                 f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
            files += found
            labels += [c] * len(found)
        if not files:
            raise ValueError(f"data folder {root!r} holds no images (looked for "
                             f"{', '.join(IMAGE_EXTENSIONS)}, recursively)")
        sizes, gray = {}, True
        for f in files:
            try:
                with Image.open(f) as im:
                    sizes.setdefault(im.size, f)
                    gray = gray and im.mode in _GRAY_MODES
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image file {f!r}: {e}") from None
        if resolution is None:
            if len(sizes) > 1:
                (s1, f1), (s2, f2) = list(sizes.items())[:2]
                raise ValueError(f"images in {root!r} have different sizes ({s1[0]}x{s1[1]} "
                                 f"{f1!r}, {s2[0]}x{s2[1]} {f2!r}, ...): pass --resolution R to "
                                 "resize and center-crop them all to RxR")
            (w, h), = sizes
            if w != h:
                raise ValueError(f"images in {root!r} are {w}x{h}, not square: pass --resolution R "
                                 "to resize and center-crop them to RxR")
            resolution = w
        self._files = files
        super().__init__(root, 1 if gray else 3, resolution,
                         torch.tensor(labels, dtype=torch.int64) if class_labels else None,
                         classes if class_labels else None)

    def __len__(self):
        return len(self._files)

    def images(self, idx):
        return torch.stack([self._load(self._files[i]) for i in idx.tolist()])

    def _load(self, path: str) -> torch.Tensor:
        import numpy as np
        from PIL import Image
        R = self.resolution
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w, h = im.size
                if (w, h) != (R, R):
                    s = R / min(w, h)
                    im = im.resize((max(R, round(w * s)), max(R, round(h * s))),
                                   Image.Resampling.BICUBIC)
                    w, h = im.size
                    left, top = (w - R) // 2, (h - R) // 2
                    im = im.crop((left, top, left + R, top + R))
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise ValueError(f"cannot read image file {path!r}: {e}") from None
        x = torch.from_numpy(a.copy()).float()
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return x / 127.5 - 1.0


def _image_files(folder: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


def load_data(data: str, resolution: Optional[int] = None,
              class_labels: bool = False) -> ImageData:
    """`data`: "digits" or a folder of images (see FolderData)."""
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 1):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if data == "digits":
        return DigitsData(resolution)
    return FolderData(data, resolution, class_labels)
