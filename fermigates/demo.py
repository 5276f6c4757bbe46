"""``fermigates demo``: the main job end to end on a bundled example that needs nothing from the network.

The data are **synthetic shapes**: 16x16 grey images of ten kinds of glyph (bars, diagonals, a ring, a disc, a
square, a plus, an X, two dots), each drawn at a random position, size, angle, thickness and contrast under
strong pixel noise, from a fixed seed. They ship as code, not files, so the demo runs right after
``pip install fermigates`` (no scikit-learn, no download), gives the same numbers on every machine, and is a
real task: the classes differ only in shape, and the noise keeps a small CNN from being perfect.

The demo trains a small CNN on them (dense, 4,000 samples), then runs the same pipeline as
``fermigates prune`` (recipe ``demo``): convert to channel gates, fine-tune while the annealer steers the model to
half its MACs, bake, calibrate, shrink, save; and reloads the checkpoint into a fresh model to show that the
accuracy and the speed-up survive the round trip.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("horizontal bar", "vertical bar", "diagonal \\", "diagonal /", "ring", "disc", "square", "plus", "X",
           "two dots")
SIDE = 16
MEAN, STD = (0.5,), (0.25,)
DEMO_SPEC = "py:fermigates.demo:shapes_cnn"


# -- the data --------------------------------------------------------------------------------------------------
def _glyph(kind: int, u: np.ndarray, v: np.ndarray, t: float) -> np.ndarray:
    """Distance-like field of glyph ``kind`` on coordinates ``u, v`` (the glyph is where it is < 0)."""
    r = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    inside = np.where(box < 0.75, 0.0, box - 0.75)
    d = {
        0: np.maximum(np.abs(v) - t, np.abs(u) - 0.75),
        1: np.maximum(np.abs(u) - t, np.abs(v) - 0.75),
        2: np.abs(u - v) / math.sqrt(2) - t + inside,
        3: np.abs(u + v) / math.sqrt(2) - t + inside,
        4: np.abs(r - 0.6) - t,
        5: r - 0.55,
        6: np.abs(box - 0.6) - t,
        7: np.minimum(np.maximum(np.abs(v) - t, np.abs(u) - 0.75), np.maximum(np.abs(u) - t, np.abs(v) - 0.75)),
        8: np.minimum(np.abs(u - v), np.abs(u + v)) / math.sqrt(2) - t + inside,
        9: np.minimum(np.hypot(u - 0.45, v), np.hypot(u + 0.45, v)) - 0.25,
    }[kind]
    return d


def make_shapes(n: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic shape images (``uint8 [n, 1, 16, 16]``) and their labels (``int64 [n]``), the same for the
    same ``seed``: ten glyph kinds, balanced, each at a random shift (up to a fifth of the image), scale
    (0.75-1.15), angle (+-25 degrees), thickness, contrast and background, under Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(-1, 1, SIDE)
    gy, gx = np.meshgrid(axis, axis, indexing="ij")
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, 1, SIDE, SIDE), dtype=np.uint8)
    for i, kind in enumerate(labels):
        angle = math.radians(rng.uniform(-25, 25))
        scale = rng.uniform(0.75, 1.15)
        dx, dy = rng.uniform(-0.2, 0.2, size=2)
        x, y = (gx - dx) / scale, (gy - dy) / scale
        u = math.cos(angle) * x + math.sin(angle) * y
        v = -math.sin(angle) * x + math.cos(angle) * y
        field = _glyph(int(kind), u, v, rng.uniform(0.1, 0.18))
        ink = np.clip(0.5 - field / 0.12, 0.0, 1.0) * rng.uniform(0.5, 1.0)
        img = ink + rng.uniform(0.0, 0.25) + rng.normal(0.0, noise, size=ink.shape)
        images[i, 0] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


# -- the model -------------------------------------------------------------------------------------------------
def shapes_cnn(width: int = 16, classes: int = len(CLASSES)) -> Any:
    """The demo's CNN: four 3x3 conv + batch-norm + ReLU blocks (widths ``w, 2w, 4w, 4w``, two of them strided),
    global average pooling and a linear classifier, for 1x16x16 inputs. Its ``pretrained_cfg`` tells the data
    readers the input size and normalisation, as a timm model's does."""
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    model = nn.Sequential(*block(1, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))
    model.pretrained_cfg = {"input_size": (1, SIDE, SIDE), "mean": MEAN, "std": STD, "classifier": "14"}
    return model


def _train_dense(model: Any, x: Any, y: Any, steps: int, quiet: bool) -> None:
    """Plain supervised training (AdamW, cosine learning rate, batch 64) of the dense model."""
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    bar = tqdm(range(steps), desc="train the dense model", disable=quiet, leave=False, file=sys.stderr)
    for _ in bar:
        if pos + 64 > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + 64]
        pos += 64
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


# -- the run ---------------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    out: Path
    details: dict[str, Any]
    text: str


SIZES = {"full": {"train": 4000, "test": 1000, "dense_steps": 600, "steps": 600},
         "quick": {"train": 400, "test": 100, "dense_steps": 20, "steps": 8}}


def _replaceable(out: Path) -> bool:
    """Whether ``out`` holds an earlier demo run (which a new demo replaces without --force)."""
    recipe = out / "recipe.yaml"
    return recipe.is_file() and DEMO_SPEC in recipe.read_text(errors="replace")


def run_demo(out: str | Path = "fermigates-demo", *, quick: bool = False, quiet: bool = False,
             force: bool = False) -> DemoResult:
    """Make the data, train the dense CNN, run the ``demo`` recipe through :func:`fermigates.pipeline.run_recipe`
    into ``out``, reload the checkpoint and compare; returns the summary text (printed by ``fermigates demo``)."""
    import torch

    from .io.checkpoint import load_shrunk
    from .pipeline import run_recipe, stage
    from .recipe import load_recipe
    from .report import format_summary

    out = Path(out)
    size = SIZES["quick" if quick else "full"]
    started = time.perf_counter()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="fermigates-demo-") as work:
        work_dir = Path(work)
        with stage(f"make {size['train'] + size['test']:,} synthetic shape images", quiet):
            x, y = make_shapes(size["train"] + size["test"], seed=0)
            np.savez(work_dir / "shapes-train.npz", x=x[:size["train"]], y=y[:size["train"]])
            np.savez(work_dir / "shapes-test.npz", x=x[size["train"]:], y=y[size["train"]:])
        model = shapes_cnn()
        xt = (torch.from_numpy(x[:size["train"]]).float() / 255 - MEAN[0]) / STD[0]
        _train_dense(model, xt, torch.from_numpy(y[:size["train"]]), size["dense_steps"], quiet)
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(work_dir / "dense.safetensors"))
        overrides = {"train.steps": size["steps"], "eval.samples": size["test"]}
        recipe = load_recipe("demo", overrides=overrides)
        result = run_recipe(recipe, DEMO_SPEC, str(work_dir / "shapes-train.npz"), out,
                            weights=str(work_dir / "dense.safetensors"), eval_data=str(work_dir / "shapes-test.npz"),
                            quiet=quiet, force=force or _replaceable(out))
        with stage("reload the checkpoint into a fresh model", quiet):
            reloaded = load_shrunk(shapes_cnn, out).eval()
            xs = (torch.from_numpy(x[size["train"]:]).float() / 255 - MEAN[0]) / STD[0]
            with torch.no_grad():
                accuracy = float((reloaded(xs).argmax(1) == torch.from_numpy(y[size["train"]:])).float().mean())
    details = result.details
    final = details.get("evaluation", {}).get("phases", {}).get("final", {}).get("accuracy")
    details["demo"] = {"data": f"synthetic shapes, {len(CLASSES)} classes, {size['train']:,} training and "
                               f"{size['test']:,} test images of {SIDE}x{SIDE}",
                       "reloaded_accuracy": accuracy, "seconds": time.perf_counter() - started}
    (out / "report.json").write_text(json.dumps(details, indent=1, default=str) + "\n")
    same = "the same as" if final is not None and abs(final - accuracy) < 1e-6 else "vs"
    lines = [format_summary(details),
             f"  reloaded     {out / 'model.safetensors'} into a fresh shapes_cnn(): accuracy {accuracy:.3f} "
             f"({same} after fine-tuning{'' if same == 'the same as' else f' {final}'})",
             f"  data         {details['demo']['data']} (generated from a fixed seed: nothing is downloaded)",
             f"wrote {out}: " + ", ".join(result.files),
             f"demo done in {details['demo']['seconds']:.0f} s; `fermigates report {out} --full` shows every gate"]
    return DemoResult(out, details, "\n".join(lines))

