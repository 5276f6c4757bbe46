"""The ``--data`` specs of ``fermigates prune``: data users already have, read into tensors.

  DIR or images:DIR       an image folder (DIR/<class>/*.jpg gives labels; a flat DIR/*.png none)
  FILE.npz or npz:FILE    arrays: x (or inputs / images) and optional y (labels); or input_ids
                          [+ attention_mask, token_type_ids, labels] for text
  FILE.txt or text:FILE   one sample per line, tokenised with the model's tokenizer (hf:PATH folders)
  fashion-mnist:DIR       Fashion-MNIST / MNIST IDX files (train-images-idx3-ubyte[.gz] + labels; its
                          t10k files are the default evaluation data); DIR may also be the images file

Every image reader (folders, IDX, and uint8 arrays in a .npz) gives the same inputs: pixels scaled to [0, 1],
resized to the model's input size (folders and IDX), normalised with the model's mean / std (its pretrained
config when it has one, else ImageNet's). Float arrays in a .npz are taken as they are.

:func:`check_data_spec` looks at the file system only (no torch); with ``deep=True`` it also reads the files'
headers and contents (sample and label counts, truncated or corrupt files), so that bad data fails before a
model is built.
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("images", "npz", "text", "fashion-mnist")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_INPUT_KEYS = ("x", "inputs", "images")
_LABEL_KEYS = ("y", "labels", "label")
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class DataSpecError(ValueError):
    """A ``--data`` spec that does not exist, is of an unknown kind, or holds unusable arrays."""


@dataclass
class Samples:
    """Samples read from a spec: ``inputs`` is a tensor or a dict of tensors with the samples along dim 0."""

    inputs: Any
    labels: Any = None  # a LongTensor of class indices, or None
    kind: str = ""
    classes: int | None = None  # the number of classes the labels index (folders: the subfolders)

    def __len__(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs
        return int(first.shape[0])

    def take(self, index: Any) -> Samples:
        """The samples at ``index`` (a slice or an index tensor)."""
        inputs = ({k: v[index] for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else self.inputs[index])
        return Samples(inputs, None if self.labels is None else self.labels[index], self.kind, self.classes)

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


def check_data_spec(spec: str, *, deep: bool = False) -> tuple[str, Path]:
    """``(kind, path)`` of a spec; :class:`DataSpecError` says what is wrong. ``deep`` also reads the data's
    headers and counts (no torch)."""
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
    if deep:
        _probe(kind, path, spec)
    return kind, path


def default_eval_spec(spec: str) -> str | None:
    """The held-out data that comes with a spec: the ``t10k`` files beside Fashion-MNIST / MNIST training files."""
    kind, path = check_data_spec(spec)
    if kind != "fashion-mnist":
        return None
    images = _idx_images(path) if path.is_dir() else path
    if images is None or not images.name.startswith("train"):
        return None
    test = images.with_name(images.name.replace("train", "t10k", 1))
    labels = test.with_name(test.name.replace("images-idx3", "labels-idx1"))
    return f"fashion-mnist:{test}" if test.is_file() and labels.is_file() else None


def _probe(kind: str, path: Path, spec: str) -> None:
    """Read enough of the data to refuse what the run would fail on later."""
    if kind == "npz":
        x, y, _ = _npz_arrays(path, spec)
        if y is not None and len(y) < len(x):
            raise DataSpecError(f"--data {spec!r}: {len(x)} samples but only {len(y)} labels")
    elif kind == "fashion-mnist":
        images = _idx_images(path) if path.is_dir() else path
        assert images is not None
        x = _read_idx(images)
        if x.ndim != 3 or not len(x):
            raise DataSpecError(f"--data {spec!r}: {images} holds no images (shape {list(x.shape)})")
        label_path = _idx_labels(images)
        if label_path.exists():
            y = _read_idx(label_path)
            if len(y) < len(x):
                raise DataSpecError(f"--data {spec!r}: {images} has {len(x)} images but {label_path.name} only "
                                    f"{len(y)} labels")
    elif kind == "text":
        if not _text_lines(path, spec):
            raise DataSpecError(f"--data {spec!r}: the file has no non-empty lines")
    elif not _image_files(path)[0]:
        raise DataSpecError(f"--data {spec!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {path} or its class "
                            "subfolders")


def load_samples(spec: str, *, limit: int, input_size: tuple[int, int, int] | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 tokenizer: Any = None, max_length: int = 128, seed: int | None = None,
                 progress: bool = False) -> Samples:
    """Read at most ``limit`` samples of ``spec``: the first ones, or with ``seed`` a random subset in random
    order (the same for the same seed). Images (and IDX digits) are resized to ``input_size`` ``(C, H, W)`` when
    given and normalised with ``mean`` / ``std``; text needs ``tokenizer`` (a callable like a transformers
    tokenizer)."""
    kind, path = check_data_spec(spec)
    if kind == "npz":
        return _npz(path, spec, limit, seed, mean, std)
    if kind == "text":
        return _text(path, spec, limit, tokenizer, max_length, seed)
    if kind == "fashion-mnist":
        return _idx(path, spec, limit, input_size, mean, std, seed)
    return _images(path, spec, limit, input_size or (3, 224, 224), mean, std, seed, progress)


def _choose(total: int, limit: int, seed: int | None) -> Any:
    """Indices of the samples to read: the first ``limit``, or a seeded random subset in random order."""
    import numpy as np

    if seed is None:
        return np.arange(min(limit, total))
    return np.random.default_rng(seed).permutation(total)[:limit]


def _normalise(x: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """``(x - mean) / std`` per channel of an ``(N, C, H, W)`` tensor in [0, 1]."""
    import torch

    c = x.shape[1]
    m, s = (mean[:c], std[:c]) if len(mean) >= c else (mean[:1] * c, std[:1] * c)
    return (x - torch.tensor(m, dtype=x.dtype).view(1, -1, 1, 1)) / torch.tensor(s, dtype=x.dtype).view(1, -1, 1, 1)


# -- .npz ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _npz_cached(path: str, mtime: int, size: int) -> dict[str, Any]:
    import numpy as np

    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _npz_arrays(path: Path, spec: str) -> tuple[Any, Any, str]:
    """``(inputs, labels or None, kind)`` of a .npz: kind ``"text"`` (a dict of token arrays) or ``"x"``."""
    try:
        stat = path.stat()
        arrays = _npz_cached(str(path), stat.st_mtime_ns, stat.st_size)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise DataSpecError(f"--data {spec!r}: not a readable .npz file ({type(err).__name__}: {err})") from None
    labels = next((arrays[k] for k in _LABEL_KEYS if k in arrays), None)
    if "input_ids" in arrays:
        inputs: Any = {k: arrays[k] for k in _TEXT_KEYS if k in arrays}
        first, what = inputs["input_ids"], "text"
    else:
        key = next((k for k in _INPUT_KEYS if k in arrays), None)
        if key is None:
            raise DataSpecError(f"--data {spec!r}: the .npz needs an array 'x' (or 'inputs', 'images', or "
                                f"'input_ids' for text); it has {sorted(arrays)}")
        inputs = first = arrays[key]
        what = "x"
    if first.ndim == 0 or not len(first):
        raise DataSpecError(f"--data {spec!r}: the .npz holds no samples ({what} has shape {list(first.shape)})")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iub" and not (
                labels.dtype.kind == "f" and (labels == labels.round()).all()):
            raise DataSpecError(f"--data {spec!r}: the labels must be a 1-D array of class indices, got "
                                f"{labels.dtype} of shape {list(labels.shape)}")
        if len(labels) and labels.min() < 0:
            raise DataSpecError(f"--data {spec!r}: the labels must be class indices >= 0, found {labels.min()}")
    return inputs, labels, what


def _npz(path: Path, spec: str, limit: int, seed: int | None, mean: tuple[float, ...],
         std: tuple[float, ...]) -> Samples:
    import numpy as np
    import torch

    inputs, labels, what = _npz_arrays(path, spec)
    if labels is not None and len(labels) < len(inputs if what == "x" else inputs["input_ids"]):
        raise DataSpecError(f"--data {spec!r}: {len(inputs if what == 'x' else inputs['input_ids'])} samples but "
                            f"only {len(labels)} labels")
    total = len(inputs) if what == "x" else len(inputs["input_ids"])
    pick = _choose(total, limit, seed)
    if what == "text":
        out: Any = {k: torch.as_tensor(v[pick]).long() for k, v in inputs.items()}
    else:
        x = inputs[pick]
        out = torch.as_tensor(x).float() if x.dtype.kind in "fu" else torch.as_tensor(x)
        if x.dtype == np.uint8:  # raw pixels: the same normalisation as every image reader
            out = out / 255.0
            if out.dim() == 3:
                out = out.unsqueeze(1)
            if out.dim() == 4 and out.shape[1] in (1, 3):
                out = _normalise(out, mean, std)
    y = None if labels is None else torch.as_tensor(labels[pick]).long()
    classes = None if labels is None else int(labels.max()) + 1
    return Samples(out, y, "npz", classes)


# -- text ------------------------------------------------------------------------------------------------------
def _text_lines(path: Path, spec: str) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise DataSpecError(f"--data {spec!r}: cannot read it ({err})") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def _text(path: Path, spec: str, limit: int, tokenizer: Any, max_length: int, seed: int | None) -> Samples:
    if tokenizer is None:
        raise DataSpecError(f"--data {spec!r}: a text file is tokenised with the model's tokenizer; the model has "
                            "none (use an hf:PATH folder that holds tokenizer files, or a .npz of input_ids)")
    lines = _text_lines(path, spec)
    if not lines:
        raise DataSpecError(f"--data {spec!r}: the file has no non-empty lines")
    lines = [lines[i] for i in _choose(len(lines), limit, seed)]
    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k in _TEXT_KEYS}
    # trim the padding every sample shares (shorter batches, same results)
    mask = inputs.get("attention_mask")
    if mask is not None:
        width = int(mask.sum(1).max())
        inputs = {k: v[:, :width] for k, v in inputs.items()}
    return Samples(inputs, None, "text")


# -- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------------------------
def _idx_images(folder: Path) -> Path | None:
    found = sorted(p for p in folder.iterdir() if "images-idx3-ubyte" in p.name)
    train = [p for p in found if p.name.startswith("train")]
    return (train or found or [None])[0]


def _idx_labels(images: Path) -> Path:
    return images.with_name(images.name.replace("images-idx3", "labels-idx1"))


def _read_idx(path: Path) -> Any:
    stat = path.stat()
    return _read_idx_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_idx_cached(name: str, mtime: int, size: int) -> Any:
    """The array in an IDX file (gzipped or not), checked against the sizes its header gives."""
    import numpy as np

    path = Path(name)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataSpecError(f"{path} is corrupt: cannot decompress it ({type(err).__name__}: {err})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        raise DataSpecError(f"{path} is not an IDX file of bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataSpecError(f"{path} is truncated: its header is incomplete")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    need = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if len(data) != need:
        raise DataSpecError(f"{path} is {'truncated' if len(data) < need else 'corrupt'}: its header gives shape "
                            f"{list(dims)} ({need:,} bytes), the file has {len(data):,} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx(path: Path, spec: str, limit: int, input_size: tuple[int, int, int] | None, mean: tuple[float, ...],
         std: tuple[float, ...], seed: int | None) -> Samples:
    import torch

    images = _idx_images(path) if path.is_dir() else path
    assert images is not None
    raw = _read_idx(images)
    pick = _choose(len(raw), limit, seed)
    x = torch.as_tensor(raw[pick].copy()).float().div(255.0).unsqueeze(1)
    label_path = _idx_labels(images)
    y = classes = None
    if label_path.exists():
        labels = _read_idx(label_path)
        if len(labels) < len(raw):
            raise DataSpecError(f"--data {spec!r}: {images} has {len(raw)} images but {label_path.name} only "
                                f"{len(labels)} labels")
        y = torch.as_tensor(labels[pick].copy()).long()
        classes = int(labels.max()) + 1
    if input_size is not None:
        c, h, w = input_size
        if (h, w) != tuple(x.shape[-2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if c != 1:
            x = x.expand(-1, c, -1, -1).contiguous()
    return Samples(_normalise(x, mean, std), y, "fashion-mnist", classes)


# -- image folders ---------------------------------------------------------------------------------------------
def _image_files(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return files, classes


def _images(folder: Path, spec: str, limit: int, input_size: tuple[int, int, int], mean: tuple[float, ...],
            std: tuple[float, ...], seed: int | None, progress: bool) -> Samples:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    try:
        from PIL import Image
    except ImportError:
        raise DataSpecError("reading an image folder needs Pillow: pip install pillow") from None
    files, classes = _image_files(folder)
    if not files:
        raise DataSpecError(f"--data {spec!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} or its "
                            "class subfolders")
    if seed is not None:
        files = [files[i] for i in _choose(len(files), limit, seed)]
    elif len(files) > limit:  # spread the limit over the classes (files are sorted by class)
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    c, h, w = input_size
    tensors = []
    for f, _ in tqdm(files, desc="read images", disable=not progress, leave=False, unit="img"):
        try:
            img = Image.open(f).convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        except Exception as err:  # noqa: BLE001
            raise DataSpecError(f"--data {spec!r}: cannot read image {f}: {err}") from None
        arr = np.asarray(img, dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(arr.reshape(h, w, -1)).permute(2, 0, 1))
    x = torch.stack(tensors)
    y = torch.tensor([label for _, label in files]) if classes else None
    return Samples(_normalise(x, mean, std), y, "images", len(classes) or None)
