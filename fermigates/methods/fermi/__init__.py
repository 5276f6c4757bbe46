"""The Fermi gate method: magnitude-scored retention probabilities ``sigmoid((s / scale - mu) / T)``.

``gates`` the gate itself; ``layers`` the gated twins of Linear / Conv; ``group_gates`` one gate per coupled
channel / head group of the dependency graph; ``model`` enumerating a converted model's gates; ``anneal``
the temperature / sparsity schedules and ``FermiAnnealer``; ``refine`` gate-only training with frozen weights.
"""

from ..registry import register_method
from .method import FermiMethod

register_method(FermiMethod())
