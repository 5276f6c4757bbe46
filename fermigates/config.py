"""``FermiConfig``: what to gate and how, as a documented dataclass with a dict / YAML round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .allocation.budget import Budget, check_sparsity
from .core.options import Options, option
from .methods.registry import get_method

CONFIG_VERSION = 1
#: the share of units removed when a config names neither a budget nor a target_sparsity
DEFAULT_SPARSITY = 0.5
_help = option


@dataclass
class FermiConfig(Options):
    """How ``convert_to_fermi`` gates a model. Every field carries its help text in ``metadata``."""

    granularity: str | tuple[str, ...] = _help(
        "'weight' (unstructured), 'channel' (output channels / neurons, coupled across the dependency "
        "graph) or 'head' (attention heads); a tuple such as ('channel', 'head') gates both.",
        default="weight",
    )
    target_sparsity: float | dict[str, float] | None = _help(
        "Fraction of gated units to remove at the end of annealing (0 <= s < 1), or one per granularity, "
        "e.g. {'channel': 0.5, 'head': 0.25}. None: 0.5 when no budget is given (a budget replaces it; giving "
        "both is an error).",
        default=None,
    )
    budget: str | None = _help(
        "What the pruned model keeps, as a fraction: 'macs:0.5' (2x fewer MACs per forward of the example "
        "inputs), 'params:0.7', 'units:0.5' or 'latency:0.5' (measured on this machine; one-shot prune only). "
        "Replaces target_sparsity in fermigates.prune and FermiAnnealer when neither is given a budget or a "
        "target_sparsity of its own (so a config takes one or the other). Structured granularities only. None: "
        "target_sparsity applies.",
        default=None,
    )
    temperature: float = _help(
        "Initial temperature of every gate, in units of the layer's mean score (the annealer then sets it).",
        default=1.0,
    )
    mu_init: str | float = _help(
        "'open': gates start fully open, the converted model computes the original function; or a "
        "percentile in [0, 1): mu starts at that quantile of the scores.",
        default="open",
    )
    target_modules: str | list[str] | None = _help(
        "Which modules to gate: a regex (full match on the module name) or a list of exact names / name "
        "suffixes (peft's convention). None: every Linear / Conv (and registered linear-like layers).",
        default=None,
    )
    exclude_modules: str | list[str] | None = _help(
        "Modules never to gate, same matching rules as target_modules.", default=None
    )
    keep_classifier: bool = _help(
        "Leave the final classifier / LM head ungated (its outputs are the model's classes).", default=True
    )
    round_to: int = _help(
        "Channel gates keep a multiple of this many channels (the kept count is rounded up, so sparsity lands "
        "at or below the target). Widths that are multiples of 8 (AVX2) or 16 (AVX-512, GPU tensor cores) "
        "run faster after shrinking. Heads and single weights are never rounded.",
        default=1,
    )
    min_units: int = _help(
        "Groups and layers with fewer units than this are not gated (tiny layers are not worth it).",
        default=1,
    )
    method: str = _help(
        "How to decide what to cut: 'fermi' (Fermi gates, annealed by FermiAnnealer), 'deepr' (Deep Rewiring: "
        "sign-fixed connections, exactly 1 - target_sparsity of them active, trained by DEEPR) or 'softdeepr' "
        "(the same layers, trained by SoftDEEPR: no fixed count). See fermigates.methods.",
        default="fermi",
    )
    method_options: dict[str, Any] | None = _help(
        "Options of the method (a dict, so recipes stay YAML): for 'deepr' / 'softdeepr' the fields of "
        "fermigates.RewireConfig (handle_biases, keep_signs, init, seed). None: the method's defaults.",
        default=None,
    )
    version: int = _help("Config format version.", default=CONFIG_VERSION)

    what = "FermiConfig"

    @property
    def granularities(self) -> tuple[str, ...]:
        g = self.granularity
        return (g,) if isinstance(g, str) else tuple(g)

    @property
    def structured(self) -> bool:
        """Whether the method's decisions remove whole units (channels, heads) that the shared shrink cuts."""
        return get_method(self.method).structured(self)

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the field when a value has the wrong type or range."""
        g = self.granularity
        if not isinstance(g, (str, tuple, list)) or (not isinstance(g, str) and not g):
            raise ValueError(
                f"granularity must be 'weight', 'channel', 'head' or a non-empty tuple of them, got {g!r}"
            )
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int) or self.min_units < 0:
            raise ValueError(f"min_units must be an int >= 0 (e.g. 8), got {self.min_units!r}")
        if not isinstance(self.keep_classifier, bool):
            raise TypeError(f"keep_classifier must be True or False, got {self.keep_classifier!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError(f"version must be an int, got {self.version!r}")
        if self.budget is not None:
            if not isinstance(self.budget, (str, dict, Budget)):
                raise TypeError(f"budget must be a string like 'macs:0.5' or None, got {type(self.budget).__name__}")
            self.budget = str(Budget.parse(self.budget))  # a string, so the config stays YAML
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise TypeError(f"{name} must be a regex string, a list of names or None, got {type(value).__name__}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be an int >= 1 (e.g. 8), got {self.round_to!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this fermigates ({CONFIG_VERSION})")
        if self.method_options is not None and not isinstance(self.method_options, dict):
            raise TypeError(f"method_options must be a dict or None, got {type(self.method_options).__name__}")
        if self.budget is not None and self.target_sparsity is not None:
            raise ValueError(f"give FermiConfig either budget= or target_sparsity=, not both (got budget="
                             f"{self.budget!r}, target_sparsity={self.target_sparsity!r}): a budget sets each "
                             "gate's share")
        if self.budget is None and self.target_sparsity is None:
            self.target_sparsity = DEFAULT_SPARSITY
        method = get_method(self.method)
        method.check_config(self)  # granularities, method_options and the method's own fields
        if self.target_sparsity is not None:
            check_sparsity(self.target_sparsity, self.granularities)
        if self.budget is not None and not method.structured(self):
            raise ValueError(f"budget={self.budget!r} chooses channels / heads: use granularity 'channel' and/or "
                             "'head' (weight gates take target_sparsity)")

    @classmethod
    def _from_dict_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("granularity"), list):
            data["granularity"] = tuple(data["granularity"])
        return data
