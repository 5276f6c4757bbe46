"""timm layers that are safe to gate like the torch class they extend."""

from __future__ import annotations

import torch.nn as nn

from . import registry


def _linear_twin(module: nn.Module) -> nn.Module:
    from fermigates.layers import FermiLinear, make_twin

    return make_twin(module, FermiLinear)


# timm.layers.Linear only adds a torchscript cast in forward: gating it like nn.Linear keeps its function.
registry.register(registry.TWINS, "timm.layers.linear.Linear", _linear_twin)
