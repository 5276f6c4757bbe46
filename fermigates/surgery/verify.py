"""Checks that a surgery kept the function: the tolerance a shrink or a fold must meet."""

from __future__ import annotations

#: shrunk and hard-masked outputs may differ by float reassociation only: relative to the output's scale
SHRINK_RTOL = 1e-4
#: what each module a shrink resized may add to that: a deep float32 network (a 30-block LLM with massive
#: activations) sums reassociation errors over every resized matmul; a wrong slice moves outputs by far more
PER_MODULE_RTOL = 2e-6
#: the most the tolerance grows to, however many modules were resized
MAX_RTOL = 1e-2


def shrink_tolerance(n_changed: int) -> float:
    """The largest relative difference between a shrunk model and its hard-masked self that is float rounding:
    :data:`SHRINK_RTOL`, plus :data:`PER_MODULE_RTOL` for every module the shrink resized (at most
    :data:`MAX_RTOL`)."""
    return min(MAX_RTOL, max(SHRINK_RTOL, PER_MODULE_RTOL * n_changed))
