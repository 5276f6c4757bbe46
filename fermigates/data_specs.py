"""The ``--data`` specs of ``fermigates prune``: data users already have, read into tensors.

=========================  ==========================================================================
spec                       what it reads
=========================  ==========================================================================
``DIR`` / ``images:DIR``   an image folder (``DIR/<class>/*.jpg`` gives labels; flat ``DIR/*.png`` none),
                           resized to the model's input size and normalised with its mean / std
``FILE.npz`` / ``npz:F``   arrays: ``x`` (or ``inputs`` / ``images``) and optional ``y`` (``labels``); or
                           ``input_ids`` [+ ``attention_mask``, ``token_type_ids``, ``labels``] for text
``FILE.txt`` / ``text:F``  one sample per line, tokenised with the model's tokenizer (``hf:PATH`` folders)
``fashion-mnist:DIR``      Fashion-MNIST / MNIST IDX files (``train-images-idx3-ubyte[.gz]`` + labels);
                           ``DIR`` may also be the images file itself
=========================  ==========================================================================

:func:`check_data_spec` only looks at the file system (no torch), so a bad spec fails before a model is built.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("images", "npz", "text", "fashion-mnist")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataSpecError(ValueError):
    """A ``--data`` spec that does not exist, is of an unknown kind, or holds unusable arrays."""


@dataclass
class Samples:
    """Samples read from a spec: ``inputs`` is a tensor or a dict of tensors with the samples along dim 0."""

    inputs: Any
    labels: Any = None  # a LongTensor of class indices, or None
    kind: str = ""

    def __len__(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs
        return int(first.shape[0])

    def batches(self, batch_size: int, limit: int | None = None, *, labels: bool = False) -> list[Any]:
        """Consecutive batches of at most ``limit`` samples: tensors, dicts, or ``(x, y)`` with ``labels``."""
        n = len(self) if limit is None else min(limit, len(self))
        out = []
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            if isinstance(self.inputs, dict):
                batch: Any = {k: v[start:end] for k, v in self.inputs.items()}
            else:
                batch = self.inputs[start:end]
            if labels and self.labels is not None:
                batch = (batch, self.labels[start:end])
            out.append(batch)
        return out


def check_data_spec(spec: str) -> tuple[str, Path]:
    """``(kind, path)`` of a spec, checked on the file system only; :class:`DataSpecError` says what is wrong."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        path = Path(rest)
    else:
        kind, path = "", Path(spec)
    if not path.exists():
        raise DataSpecError(f"--data {spec!r}: {path} does not exist (specs: an image folder, a .npz file, a .txt "
                            "file with one sample per line, or fashion-mnist:DIR with IDX files)")
    if not kind:
        if path.is_dir():
            kind = "fashion-mnist" if _idx_images(path) is not None else "images"
        elif path.suffix == ".npz":
            kind = "npz"
        elif path.suffix == ".txt":
            kind = "text"
        elif "idx3-ubyte" in path.name:
            kind = "fashion-mnist"
        else:
            raise DataSpecError(f"--data {spec!r}: cannot tell the kind from the name; use a prefix, one of "
                                f"{[k + ':' for k in KINDS]}")
    if kind == "images" and not path.is_dir():
        raise DataSpecError(f"--data {spec!r}: an image folder must be a directory")
    if kind == "fashion-mnist" and path.is_dir() and _idx_images(path) is None:
        raise DataSpecError(f"--data {spec!r}: no *-images-idx3-ubyte[.gz] file in {path}")
    return kind, path


def load_samples(spec: str, *, limit: int, input_size: tuple[int, int, int] | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 tokenizer: Any = None, max_length: int = 128) -> Samples:
    """Read at most ``limit`` samples of ``spec``. Images (and IDX digits) are resized to ``input_size``
    ``(C, H, W)`` when given; text needs ``tokenizer`` (a callable like a transformers tokenizer)."""
    kind, path = check_data_spec(spec)
    if kind == "npz":
        return _npz(path, spec, limit)
    if kind == "text":
        return _text(path, spec, limit, tokenizer, max_length)
    if kind == "fashion-mnist":
        return _idx(path, spec, limit, input_size)
    return _images(path, spec, limit, input_size or (3, 224, 224), mean, std)


def _npz(path: Path, spec: str, limit: int) -> Samples:
    import numpy as np
    import torch

    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise DataSpecError(f"--data {spec!r}: not a readable .npz file ({err})") from None
    labels = next((arrays[k] for k in ("y", "labels", "label") if k in arrays), None)
    if "input_ids" in arrays:
        inputs: Any = {k: torch.as_tensor(arrays[k][:limit]).long()
                       for k in ("input_ids", "attention_mask", "token_type_ids") if k in arrays}
    else:
        key = next((k for k in ("x", "inputs", "images") if k in arrays), None)
        if key is None:
            raise DataSpecError(f"--data {spec!r}: the .npz needs an array 'x' (or 'inputs', 'images', or "
                                f"'input_ids' for text); it has {sorted(arrays)}")
        x = arrays[key][:limit]
        inputs = torch.as_tensor(x).float() if x.dtype.kind == "f" or x.dtype.kind == "u" else torch.as_tensor(x)
        if x.dtype == np.uint8:
            inputs = inputs / 255.0
    y = None if labels is None else torch.as_tensor(labels[:limit]).long()
    return Samples(inputs, y, "npz")


def _text(path: Path, spec: str, limit: int, tokenizer: Any, max_length: int) -> Samples:
    if tokenizer is None:
        raise DataSpecError(f"--data {spec!r}: a text file is tokenised with the model's tokenizer; the model has "
                            "none (use an hf:PATH folder that holds tokenizer files, or a .npz of input_ids)")
    lines = [s.strip() for s in path.read_text(errors="replace").splitlines()]
    lines = [s for s in lines if s][:limit]
    if not lines:
        raise DataSpecError(f"--data {spec!r}: the file has no non-empty lines")
    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    inputs = {k: v for k, v in enc.items() if k in keep}
    # trim the padding every sample shares (shorter batches, same results)
    mask = inputs.get("attention_mask")
    if mask is not None:
        width = int(mask.sum(1).max())
        inputs = {k: v[:, :width] for k, v in inputs.items()}
    return Samples(inputs, None, "text")


def _idx_images(folder: Path) -> Path | None:
    found = sorted(p for p in folder.iterdir() if "images-idx3-ubyte" in p.name)
    train = [p for p in found if p.name.startswith("train")]
    return (train or found or [None])[0]


def _read_idx(path: Path) -> Any:
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataSpecError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx(path: Path, spec: str, limit: int, input_size: tuple[int, int, int] | None) -> Samples:
    import torch

    images = _idx_images(path) if path.is_dir() else path
    assert images is not None
    x = torch.as_tensor(_read_idx(images)[:limit].copy()).float().div(255.0).unsqueeze(1)
    label_path = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    y = torch.as_tensor(_read_idx(label_path)[:limit].copy()).long() if label_path.exists() else None
    if input_size is not None:
        c, h, w = input_size
        if (h, w) != tuple(x.shape[-2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if c != 1:
            x = x.expand(-1, c, -1, -1).contiguous()
    return Samples(x, y, "fashion-mnist")


def _images(folder: Path, spec: str, limit: int, input_size: tuple[int, int, int], mean: tuple[float, ...],
            std: tuple[float, ...]) -> Samples:
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError:
        raise DataSpecError("reading an image folder needs Pillow: pip install pillow") from None
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataSpecError(f"--data {spec!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} or its "
                            "class subfolders")
    # spread the limit over the classes (files are sorted by class)
    if len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    c, h, w = input_size
    tensors = []
    for f, _ in files:
        try:
            img = Image.open(f).convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        except Exception as err:  # noqa: BLE001
            raise DataSpecError(f"--data {spec!r}: cannot read image {f}: {err}") from None
        arr = np.asarray(img, dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(arr.reshape(h, w, -1)).permute(2, 0, 1))
    x = torch.stack(tensors)
    m = torch.tensor(mean[:c]).view(1, -1, 1, 1)
    s = torch.tensor(std[:c]).view(1, -1, 1, 1)
    y = torch.tensor([label for _, label in files]) if classes else None
    return Samples((x - m) / s, y, "images")
