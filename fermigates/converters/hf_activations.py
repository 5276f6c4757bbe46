"""transformers' activation modules (``ACT2FN``): element-wise, so the activation-gating method converts them."""

from __future__ import annotations

from fermigates.core import registry

registry.ACTIVATIONS.update(f"transformers.activations.{name}" for name in (
    "GELUActivation", "GELUTanh", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
    "ClippedGELUActivation", "AccurateGELUActivation", "MishActivation", "SiLUActivation", "LaplaceActivation",
    "ReLUSquaredActivation", "SqrtSoftplusActivation", "PytorchGELUTanh"))
