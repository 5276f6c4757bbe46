"""``ActivationOptions``: the options of ``FermiConfig(method="activation", method_options=...)``."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.options import Options, option
from .units import ALPHA_MODES

KEEPS = ("original", "learned")
MERGES = ("cheaper", "always", "never")


@dataclass
class ActivationOptions(Options):
    """How activations are converted and what the bake does with them; every field carries its help text."""

    alpha: str = option(
        "How each unit's a moves: 'scheduled' (the annealer fades the units it removes from 1 to 0; the others stay "
        "at 1), 'learnable' (a is trained with the network, the annealer caps the removed units' a on the same "
        "fade and its sparsity term pulls them down), 'fixed' (a stays where it is set: alpha_init, or "
        "set_alpha(model, ...)).", default="scheduled")
    alpha_init: float = option(
        "a at conversion; 1.0 computes the original network exactly.", default=1.0)
    keep: str = option(
        "What a unit that is not removed bakes to: 'original' (a = 1: the stock activation, the checkpoint loads "
        "into the stock class) or 'learned' (a as trained; a unit with 0 < a < 1 bakes to "
        "fermigates.methods.activation.PaActivation, which loading needs fermigates for).", default="original")
    merge: str = option(
        "Which layers the bake merges across a removed activation: 'cheaper' (where the merged layer needs fewer "
        "MACs), 'always' (wherever the maps compose exactly) or 'never'.", default="cheaper")
    n_remove: int | None = option(
        "A number of non-linearities to remove (instead of target_sparsity, the fraction removed, or a budget).",
        default=None)

    what = "method_options"

    def validate(self) -> None:
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {self.alpha!r}")
        a = self.alpha_init
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha_init must be a number in [0, 1] (1.0: the original activation), got {a!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        n = self.n_remove
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"n_remove must be None or an int >= 0 (how many activations to remove), got {n!r}")
