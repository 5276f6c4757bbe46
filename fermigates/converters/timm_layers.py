"""timm layers: which subclasses of torch layers compute the same function (or keep the channel semantics),
and how a fused norm + activation stands in once its batch norm is folded."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from fermigates.core import registry

# timm.layers.Linear only adds a torchscript cast in forward: a method may convert it like nn.Linear.
registry.SAME_FORWARD.add("timm.layers.linear.Linear")
# Conv2dSame pads its input before the plain conv: channels flow as in nn.Conv2d (never converted: the pad).
registry.CHANNEL_SAFE.add("timm.layers.conv2d_same.Conv2dSame")


def _norm_act_after_fold(norm: nn.Module) -> nn.Module:
    # BatchNormAct2d.forward is batch_norm -> drop -> act; the batch norm goes into the conv
    return nn.Sequential(OrderedDict(drop=norm.drop, act=norm.act))


registry.register(registry.BN_FOLD, "timm.layers.norm_act.BatchNormAct2d", _norm_act_after_fold)

# timm's element-wise activation modules (timm.layers.activations / activations_me): the activation-gating
# method converts them like torch's own
registry.ACTIVATIONS.update(f"timm.layers.activations.{name}" for name in (
    "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh", "QuickGELU",
    "PReLU"))
registry.ACTIVATIONS.update(f"timm.layers.activations_me.{name}" for name in (
    "SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe"))
