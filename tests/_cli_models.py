"""Tiny models for the command-line tests, as ``py:`` factories, with hooks the tests steer through the
environment: a marker file when the model is built (was anything built before the input was refused?), a slow
training step (a signal arrives while training), a slow save (a signal arrives while the checkpoint is written)."""

import inspect
import os
import time
from pathlib import Path

from torch import nn


def _mark(var: str) -> None:
    path = os.environ.get(var)
    if path:
        Path(path).write_text(str(os.getpid()))


class _Slow(nn.Module):
    """Identity that, when asked, sleeps in training forwards (a long fine-tune)."""

    def forward(self, x):
        if self.training and os.environ.get("FG_TEST_SLOW_TRAIN"):
            _mark("FG_TEST_SLOW_TRAIN")
            time.sleep(0.2)
        return x


def _slow_save(module, state, prefix, local_metadata):
    if os.environ.get("FG_TEST_SLOW_SAVE") and any(f.function == "save_shrunk" for f in inspect.stack()):
        _mark("FG_TEST_SLOW_SAVE")
        time.sleep(30)
    return state


def tiny(width: int = 8, classes: int = 3):
    """Conv-BN-ReLU x2, pooling, a linear classifier, for 3x8x8 inputs."""
    _mark("FG_TEST_BUILT")
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), _Slow(),
                          nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))
    model.pretrained_cfg = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                            "classifier": "9"}
    model._register_state_dict_hook(_slow_save)
    return model


def mlp(hidden: int = 8):
    """Another architecture (for refusing a run's recipe on it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

