"""``RewireConfig``: the Deep Rewiring options of ``FermiConfig(method="deepr" | "softdeepr", method_options=...)``."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.options import Options, option

BIAS_OPTIONS = ("ignore", "as_connections", "second_bias")
INIT_OPTIONS = ("magnitude", "random")


_help = option


@dataclass
class RewireConfig(Options):
    """How a layer is re-parameterised for rewiring. The fraction of connections that start active is
    ``1 - FermiConfig.target_sparsity``; every field carries its help text in ``metadata``."""

    handle_biases: str = _help(
        "'ignore': the bias stays an ordinary parameter; 'as_connections': the bias is a sign-fixed connection "
        "like the weights (it can be switched off); 'second_bias': the bias is the difference of two trained "
        "non-negative parts, so it can change sign (both parts receive gradients).",
        default="second_bias",
    )
    keep_signs: bool = _help(
        "True: each connection's fixed sign is the sign of the pretrained weight, and the converted model "
        "computes the pretrained function on its active connections. False: random signs (training from "
        "scratch, as in the paper).",
        default=True,
    )
    init: str = _help(
        "Which connections start active in each layer: 'magnitude' (the largest |w|) or 'random' (the seed's "
        "active_probability, with probability 1 - target_sparsity).",
        default="magnitude",
    )
    seed: int | None = _help("Seed for random signs and random initial connections (None: torch's global RNG).",
                             default=None)

    what = "method_options"

    def validate(self) -> None:
        if self.handle_biases not in BIAS_OPTIONS:
            raise ValueError(f"handle_biases must be one of {BIAS_OPTIONS}, got {self.handle_biases!r}")
        if not isinstance(self.keep_signs, bool):
            raise TypeError(f"keep_signs must be a bool, got {type(self.keep_signs).__name__}")
        if self.init not in INIT_OPTIONS:
            raise ValueError(f"init must be one of {INIT_OPTIONS}, got {self.init!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
