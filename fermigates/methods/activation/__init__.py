"""Activation gating (paGating units driven to the identity, the layers they separated merged).

``units`` the units ``a * act(x) + (1 - a) * x`` (and paGating's named ones); ``targets`` which modules are
activations; ``model`` enumerating a converted model's units and its views; ``select`` the cost / saving of
removing each one; ``anneal`` ``ActivationAnnealer``; ``method`` the method behind the shared interface.
"""

from ..registry import register_method
from .anneal import ActivationAnnealer
from .method import ActivationMethod
from .model import set_alpha
from .options import ActivationOptions
from .units import PaActivation, PaGELU, PaGLU, PaGTU, PaMishU, PaReGLU, PaSwishU, PaUnit, pa_unit

__all__ = ["ActivationAnnealer", "ActivationMethod", "ActivationOptions", "PaActivation", "PaGELU", "PaGLU",
           "PaGTU", "PaMishU", "PaReGLU", "PaSwishU", "PaUnit", "pa_unit", "set_alpha"]

register_method(ActivationMethod())
