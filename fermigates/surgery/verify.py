"""Checks that a surgery kept the function: the tolerance a shrink or a fold must meet."""

from __future__ import annotations

#: shrunk and hard-masked outputs may differ by float reassociation only: relative to the output's scale
SHRINK_RTOL = 1e-4
