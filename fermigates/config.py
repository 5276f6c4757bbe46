"""``FermiConfig``: what to gate and how, as a documented dataclass with a dict / YAML round trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .methods.fermi.gates import check_temperature

GRANULARITIES = ("weight", "channel", "head")
CONFIG_VERSION = 1


def check_sparsity(value: Any, granularities: tuple[str, ...] = GRANULARITIES) -> None:
    """``value`` is a fraction in [0, 1) or a dict of them keyed by granularity."""
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for key, fraction in items:
        if key is not None and key not in granularities:
            raise ValueError(f"target_sparsity keys must be among the granularities {granularities}, got {key!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1) (or a dict of such per granularity), got {value!r}")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FermiConfig:
    """How ``convert_to_fermi`` gates a model. Every field carries its help text in ``metadata``."""

    granularity: str | tuple[str, ...] = _help(
        "'weight' (unstructured), 'channel' (output channels / neurons, coupled across the dependency "
        "graph) or 'head' (attention heads); a tuple such as ('channel', 'head') gates both.",
        default="weight",
    )
    target_sparsity: float | dict[str, float] = _help(
        "Fraction of gated units to remove at the end of annealing (0 <= s < 1), or one per granularity, "
        "e.g. {'channel': 0.5, 'head': 0.25}.",
        default=0.5,
    )
    budget: str | None = _help(
        "What the pruned model keeps, as a fraction: 'macs:0.5' (2x fewer MACs per forward of the example "
        "inputs), 'params:0.7', 'units:0.5' or 'latency:0.5' (measured on this machine; one-shot prune only). "
        "Replaces target_sparsity in fermigates.prune and FermiAnnealer when neither is given a budget or a "
        "target_sparsity of its own. Structured granularities only. None: target_sparsity applies.",
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

    def __post_init__(self) -> None:
        self.validate()

    @property
    def granularities(self) -> tuple[str, ...]:
        g = self.granularity
        return (g,) if isinstance(g, str) else tuple(g)

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the field when a value has the wrong type or range."""
        g = self.granularity
        if not isinstance(g, (str, tuple, list)) or (not isinstance(g, str) and not g):
            raise ValueError(
                f"granularity must be 'weight', 'channel', 'head' or a non-empty tuple of them, got {g!r}"
            )
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(
                f"temperature must be a number > 0 (e.g. 1.0), got {type(self.temperature).__name__} "
                f"{self.temperature!r}"
            )
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int) or self.min_units < 0:
            raise ValueError(f"min_units must be an int >= 0 (e.g. 8), got {self.min_units!r}")
        if not isinstance(self.keep_classifier, bool):
            raise TypeError(f"keep_classifier must be True or False, got {self.keep_classifier!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError(f"version must be an int, got {self.version!r}")
        for g in self.granularities:
            if g not in GRANULARITIES:
                raise ValueError(f"granularity must be one of {GRANULARITIES} (or a tuple of them), got {g!r}")
        if "weight" in self.granularities and len(self.granularities) > 1:
            raise ValueError("granularity 'weight' cannot be combined with structured granularities")
        check_sparsity(self.target_sparsity, self.granularities)
        if self.budget is not None:
            from .budget import Budget  # noqa: PLC0415 - budget imports the gate machinery

            if not isinstance(self.budget, (str, dict, Budget)):
                raise TypeError(f"budget must be a string like 'macs:0.5' or None, got {type(self.budget).__name__}")
            self.budget = str(Budget.parse(self.budget))  # a string, so the config stays YAML
            if not self.structured:
                raise ValueError(f"budget={self.budget!r} chooses channels / heads: use granularity 'channel' and/or "
                                 "'head' (weight gates take target_sparsity)")
        check_temperature(self.temperature)
        if self.mu_init != "open" and not (
            isinstance(self.mu_init, (int, float)) and not isinstance(self.mu_init, bool) and 0 <= self.mu_init < 1
        ):
            raise ValueError(f"mu_init must be 'open' or a percentile in [0, 1), got {self.mu_init!r}")
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
        from .methods.registry import get_method  # noqa: PLC0415 - the methods import this module's users

        get_method(self.method).check_config(self)

    @property
    def structured(self) -> bool:
        return "weight" not in self.granularities

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["granularity"], tuple):
            d["granularity"] = list(d["granularity"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FermiConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FermiConfig fields {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("granularity"), list):
            data["granularity"] = tuple(data["granularity"])
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> "FermiConfig":
        """From a YAML file path or a YAML string."""
        text = Path(source).read_text() if Path(str(source)).suffix in (".yaml", ".yml") else str(source)
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"a FermiConfig YAML must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @staticmethod
    def help() -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(FermiConfig)}


# Recipes (the whole pipeline as one YAML file) live in fermigates.recipe: Recipe, load_recipe, list_recipes.
