"""Deep Rewiring (Bellec et al. 2018): sign-fixed connections, active while their parameter is positive.

``config`` the options (``RewireConfig``); ``layers`` the sign-fixed twins of Linear / Conv; ``optim`` the
``DEEPR`` (fixed number of active connections) and ``SoftDEEPR`` (noise, no fixed count) optimizers;
``model`` the method behind the shared interface and ``rewire_param_groups``.
"""

from ..registry import register_method
from .model import RewireMethod

register_method(RewireMethod("deepr"))
register_method(RewireMethod("softdeepr"))
