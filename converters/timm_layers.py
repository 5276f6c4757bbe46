"""timm layers: those safe to gate like the torch class they extend, and norm + activation folding."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from . import registry


def _linear_twin(module: nn.Module) -> nn.Module:
    from fermigates.methods.fermi.layers import FermiLinear, make_twin

    return make_twin(module, FermiLinear)


# timm.layers.Linear only adds a torchscript cast in forward: gating it like nn.Linear keeps its function.
registry.register(registry.TWINS, "timm.layers.linear.Linear", _linear_twin)


def _norm_act_after_fold(norm: nn.Module) -> nn.Module:
    # BatchNormAct2d.forward is batch_norm -> drop -> act; the batch norm goes into the conv
    return nn.Sequential(OrderedDict(drop=norm.drop, act=norm.act))


registry.register(registry.BN_FOLD, "timm.layers.norm_act.BatchNormAct2d", _norm_act_after_fold)
