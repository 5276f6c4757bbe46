"""Recipes: the whole pipeline (model, conversion, annealing, fine-tune, calibration, shrink, export) as one
YAML file, validated into dataclasses.

Fields are **structural** (they fix the shapes of the checkpoint a recipe produces: what is gated, at which
granularity, the budget, whether it is shrunk) or **runtime** (temperatures, schedules, steps, learning rate,
ridge, calibration size: safe to override). A recipe saved next to a checkpoint (``recipe.yaml``) refuses
overrides of its structural fields, since they would no longer describe that checkpoint.

This module imports no torch: ``fermigates recipes`` and ``--help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

RECIPE_FILE = "recipe.yaml"  # the resolved recipe, written next to a checkpoint by ``fermigates prune``
#: the first line of a recipe written next to a checkpoint: wherever such a file is read from, it describes
#: that checkpoint, and its structural keys are not overridden
RECIPE_HEADER = "# the recipe that produced this checkpoint (fermigates prune)"
#: files that mark a directory as a checkpoint a run wrote
_CHECKPOINT_MARKS = ("fermigates.json", "model.safetensors", "report.json")

# FermiConfig fields (the ``convert`` section) that only set the starting point; every other one is structural
RUNTIME_CONVERT = ("temperature", "mu_init", "version")


class RecipeError(ValueError):
    """A recipe (or an override of one) is invalid; the message names the field and what is allowed.
    ``key`` is the dotted key at fault, when known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _f(default: Any, help: str, *, structural: bool = False, factory: bool = False) -> Any:
    meta = {"help": help, "structural": structural}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool): NaN and infinities are never a meaningful setting here."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as the float YAML 1.2 (and every user) means, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """YAML text to Python values with :class:`_Loader` (safe, ``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _bad(where: str, allowed: str, value: Any) -> RecipeError:
    return RecipeError(f"{where} must be {allowed}, got {value!r}", key=where)


HEADS = ("auto", "keep")


@dataclass
class ModelSection:
    """Where the model comes from (the command's ``--model`` / ``--weights`` override it)."""

    source: str | None = _f(None, "timm:NAME, hf:PATH (a local folder) or py:module:factory (or py:file.py:factory)",
                            structural=True)
    kwargs: dict[str, Any] = _f(dict, "keyword arguments for the factory (e.g. num_classes for timm)",
                                structural=True, factory=True)
    weights: str | None = _f(None, "a .safetensors / .pt state dict loaded into the built model: by name, or by "
                                   "position for a .pt / .pth in another key layout (torchvision's); a "
                                   "classifier of another width is left out")
    pretrained: bool | str = _f(False, "timm: true loads the model's pretrained weights from the local timm / "
                                       "Hugging Face cache (nothing is downloaded), or give a weights file or a "
                                       "Hugging Face folder; false builds random weights (with a notice)")
    input_size: int | list[int] | None = _f(None, "image models: the side (or [C, H, W]) the images are resized "
                                                  "to; default the model's pretrained input size")
    head: str = _f("auto", "auto: a classifier whose width differs from the data's number of classes is replaced "
                           "by one of that width and fitted to the training samples (a linear probe) before "
                           "pruning; keep: leave the model's head as it is")

    def validate(self, where: str) -> None:
        if self.source is not None:
            if not isinstance(self.source, str) or self.source.split(":", 1)[0] not in ("timm", "hf", "py"):
                raise _bad(f"{where}.source", "'timm:NAME', 'hf:PATH' or 'py:module:factory'", self.source)
        if not isinstance(self.kwargs, dict):
            raise _bad(f"{where}.kwargs", "a mapping", self.kwargs)
        if self.weights is not None and not isinstance(self.weights, str):
            raise _bad(f"{where}.weights", "a file path", self.weights)
        if not isinstance(self.pretrained, (bool, str)) or self.pretrained == "":
            raise _bad(f"{where}.pretrained", "true, false, or a weights file / Hugging Face folder", self.pretrained)
        size = self.input_size
        if size is not None:
            sides = [size] if _is_int(size) else size
            if (not isinstance(sides, list) or len(sides) not in (1, 3)
                    or not all(_is_int(v) and 0 < v <= 8192 for v in sides)):
                raise _bad(f"{where}.input_size", "a positive int (the image side) or [C, H, W]", size)
        if self.head not in HEADS:
            raise _bad(f"{where}.head", f"one of {HEADS}", self.head)


SCHEDULES = ("linear", "exponential", "cosine")
SPARSITY_SCHEDULES = ("cubic", "linear", "constant")
ANNEAL_INITS = ("auto", "scores", "obs")


@dataclass
class AnnealSection:
    """How ``FermiAnnealer`` moves the temperature and the sparsity target during fine-tuning (runtime)."""

    temperature: list[float] = _f(lambda: [1.0, 0.01], "[T_start, T_end], in units of a layer's mean score",
                                  factory=True)
    schedule: str = _f("exponential", f"temperature schedule, one of {SCHEDULES}")
    sparsity_schedule: str = _f("cubic", f"sparsity ramp, one of {SPARSITY_SCHEDULES}")
    ramp: float = _f(0.5, "fraction of the steps over which the sparsity target ramps up (0 < ramp <= 1)")
    sparsity_weight: float = _f(1.0, "weight of the sparsity regulariser added to the loss")
    init: str = _f("auto", f"one of {ANNEAL_INITS}: the order in which units start, by weight scores or as the "
                           "one-shot pruner ranks them on the calibration samples; auto: the latter for channel / "
                           "head gates")
    bake_when_decided: bool = _f(False, "bake + calibrate when the decisions freeze and fine-tune the small model "
                                        "for the rest of the steps")

    def validate(self, where: str) -> None:
        if self.init not in ANNEAL_INITS:
            raise _bad(f"{where}.init", f"one of {ANNEAL_INITS}", self.init)
        if not isinstance(self.bake_when_decided, bool):
            raise _bad(f"{where}.bake_when_decided", "true or false", self.bake_when_decided)
        t = self.temperature
        if not isinstance(t, (list, tuple)) or len(t) != 2 or not all(_is_number(v) and v > 0 for v in t):
            raise _bad(f"{where}.temperature", "a pair [T_start, T_end] of positive numbers", t)
        self.temperature = [float(v) for v in t]
        if self.schedule not in SCHEDULES:
            raise _bad(f"{where}.schedule", f"one of {SCHEDULES}", self.schedule)
        if self.sparsity_schedule not in SPARSITY_SCHEDULES:
            raise _bad(f"{where}.sparsity_schedule", f"one of {SPARSITY_SCHEDULES}", self.sparsity_schedule)
        if not _is_number(self.ramp) or not 0 < self.ramp <= 1:
            raise _bad(f"{where}.ramp", "a number in (0, 1]", self.ramp)
        if not _is_number(self.sparsity_weight) or self.sparsity_weight < 0:
            raise _bad(f"{where}.sparsity_weight", "a finite number >= 0", self.sparsity_weight)


OPTIMIZERS = ("adamw", "adam", "sgd")
OBJECTIVES = ("auto", "labels", "distill")


@dataclass
class TrainSection:
    """The fine-tune budget (runtime). ``steps: 0`` is one-shot pruning (``fermigates.prune``)."""

    steps: int = _f(0, "optimizer steps while the temperature is annealed; 0: one-shot (no training)")
    optimizer: str = _f("adamw", f"one of {OPTIMIZERS}")
    lr: float = _f(1e-4, "learning rate")
    weight_decay: float = _f(0.0, "weight decay of the optimizer")
    batch_size: int = _f(16, "samples per training batch")
    objective: str = _f("auto", f"one of {OBJECTIVES}: labels (cross-entropy on the data's labels), distill "
                                "(MSE toward the original model's outputs), auto (labels when the data has them)")
    refine_steps: int = _f(0, "one-shot only: steps of refine_gates before baking (weights frozen)")

    def validate(self, where: str) -> None:
        for name in ("steps", "refine_steps", "batch_size"):
            v = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            if not _is_int(v) or v < low:
                raise _bad(f"{where}.{name}", f"an int >= {low}", v)
        if self.optimizer not in OPTIMIZERS:
            raise _bad(f"{where}.optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        if self.objective not in OBJECTIVES:
            raise _bad(f"{where}.objective", f"one of {OBJECTIVES}", self.objective)
        if not _is_number(self.lr) or self.lr <= 0:
            raise _bad(f"{where}.lr", "a finite number > 0", self.lr)
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise _bad(f"{where}.weight_decay", "a finite number >= 0", self.weight_decay)
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)


CALIBRATE_LAYERS = ("pruned", "all")
CALIBRATION_MODES = ("sequential", "one-pass")


@dataclass
class CalibrationSection:
    """Ridge calibration after the gates are baked (runtime); ``samples: 0`` skips it."""

    samples: int = _f(256, "calibration samples read from --data (0: no calibration)")
    batch_size: int = _f(32, "samples per calibration batch")
    ridge: float = _f(1e-2, "ridge strength of the closed-form re-fit")
    layers: str = _f("pruned", f"one of {CALIBRATE_LAYERS}: re-fit the layers that lost inputs, or every layer")
    mode: str = _f("sequential", f"one of {CALIBRATION_MODES}: re-fit in a forward of the pruned model, or (one-shot "
                   "only) from the selection pass's statistics with no second forward")

    def validate(self, where: str) -> None:
        for name, low in (("samples", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise _bad(f"{where}.{name}", f"an int >= {low}", v)
        if not _is_number(self.ridge) or self.ridge < 0:
            raise _bad(f"{where}.ridge", "a finite number >= 0", self.ridge)
        self.ridge = float(self.ridge)
        if self.layers not in CALIBRATE_LAYERS:
            raise _bad(f"{where}.layers", f"one of {CALIBRATE_LAYERS}", self.layers)
        if self.mode not in CALIBRATION_MODES:
            raise _bad(f"{where}.mode", f"one of {CALIBRATION_MODES}", self.mode)
        if self.mode == "one-pass" and self.layers != "pruned":
            raise RecipeError(f"{where}.mode 'one-pass' re-fits the layers that lost inputs only: use {where}.layers "
                              "'pruned'", key=f"{where}.mode")


@dataclass
class EvalSection:
    """What every run measures (runtime): accuracy (labelled data) or fidelity to the dense model's outputs
    (unlabelled data; perplexity for causal language models) of the dense model, after the cut and after
    fine-tuning, on samples no training or calibration step saw."""

    samples: int = _f(512, "held-out samples evaluated (0: no evaluation)")
    fraction: float = _f(0.2, "the largest share of --data held out when it has too few samples for both")
    batch_size: int = _f(32, "samples per evaluation batch (also the batch whose forward is timed)")
    data: str | None = _f(None, "a --data spec to evaluate on instead of a held-out split (--eval-data sets it; "
                                "default for fashion-mnist:DIR: its t10k test files)")
    latency: bool = _f(True, "time a forward of one evaluation batch, before and after pruning")

    def validate(self, where: str) -> None:
        for name, low in (("samples", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise _bad(f"{where}.{name}", f"an int >= {low}", v)
        if not _is_number(self.fraction) or not 0 < self.fraction < 1:
            raise _bad(f"{where}.fraction", "a number in (0, 1)", self.fraction)
        self.fraction = float(self.fraction)
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise _bad(f"{where}.data", "a --data spec (a path) or null", self.data)
        if not isinstance(self.latency, bool):
            raise _bad(f"{where}.latency", "true or false", self.latency)


EXPORT_FORMATS = ("safetensors", "onnx")


@dataclass
class Recipe:
    """One run of the pipeline. Build with :func:`load_recipe` or ``Recipe.from_dict`` / ``Recipe.from_yaml``."""

    description: str = _f("", "one line saying what the recipe does")
    model: ModelSection = _f(ModelSection, "where the model comes from", factory=True)
    convert: dict[str, Any] = _f(lambda: {"granularity": "channel", "target_sparsity": 0.5},
                                 "FermiConfig fields (what is gated, the budget)", factory=True)
    anneal: AnnealSection = _f(AnnealSection, "temperature and sparsity schedules", factory=True)
    train: TrainSection = _f(TrainSection, "fine-tune budget; steps 0 is one-shot", factory=True)
    calibration: CalibrationSection = _f(CalibrationSection, "ridge calibration", factory=True)
    eval: EvalSection = _f(EvalSection, "evaluation of the dense, cut and fine-tuned model", factory=True)
    shrink: bool = _f(True, "remove the pruned units physically (else they are zeroed)", structural=True)
    export: list[str] = _f(lambda: ["safetensors"], f"formats written, among {EXPORT_FORMATS}", factory=True)
    seed: int = _f(0, "seeds torch and numpy (new head, held-out split, training order): the same run on the "
                      "same machine gives the same checkpoint, byte for byte")
    #: the checkpoint directory this recipe was read from (structural overrides are then refused)
    applied_to: str | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`RecipeError` naming the first bad field and what it may be."""
        if not isinstance(self.description, str):
            raise _bad("description", "a string", self.description)
        self.model.validate("model")
        self.anneal.validate("anneal")
        self.train.validate("train")
        self.calibration.validate("calibration")
        self.eval.validate("eval")
        if not _is_int(self.seed) or self.seed < 0:
            raise _bad("seed", "an int >= 0", self.seed)
        if not isinstance(self.convert, dict):
            raise _bad("convert", "a mapping of FermiConfig fields", self.convert)
        for key, value in self.convert.items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise _bad(f"convert.{key}", "finite", value)
        granularity = self.convert.get("granularity", "weight")
        grans = [granularity] if isinstance(granularity, str) else granularity
        if not isinstance(grans, (list, tuple)) or not all(isinstance(g, str) for g in grans):
            raise _bad("convert.granularity", "a granularity of the method (e.g. 'channel') or a list of them",
                       granularity)  # which ones: the method says, when fermi_config() builds the FermiConfig
        if not isinstance(self.shrink, bool):
            raise _bad("shrink", "true or false", self.shrink)
        if not isinstance(self.export, list) or not all(e in EXPORT_FORMATS for e in self.export):
            raise _bad("export", f"a list among {list(EXPORT_FORMATS)}", self.export)
        if self.train.steps == 0 and self.calibration.samples == 0:
            raise RecipeError("train.steps is 0 (one-shot pruning), which reads its decisions' calibration data: "
                              "give calibration.samples > 0", key="calibration.samples")
        if self.train.steps > 0 and self.calibration.samples == 0 and (self.anneal.init == "obs"
                                                                         or self.anneal.bake_when_decided):
            raise RecipeError(f"anneal.init={self.anneal.init!r} / anneal.bake_when_decided read the calibration "
                              "samples: give calibration.samples > 0", key="calibration.samples")
        if self.train.steps > 0 and self.calibration.mode == "one-pass":
            raise RecipeError("calibration.mode 'one-pass' fits from the one-shot selection pass: use it with "
                              "train.steps 0, or calibration.mode 'sequential' after fine-tuning",
                              key="calibration.mode")
        if self.train.steps > 0 and self.anneal.init == "obs" and "weight" in grans:
            raise RecipeError("anneal.init 'obs' ranks channel and head gates: use convert.granularity 'channel' "
                              "and/or 'head', or anneal.init 'scores'", key="anneal.init")
        if self.train.steps == 0 and "weight" in grans:
            raise RecipeError("train.steps is 0 (one-shot pruning), which needs convert.granularity 'channel' "
                              "and/or 'head'; give train.steps > 0 for unstructured ('weight') gates",
                              key="train.steps")

    def fermi_config(self) -> Any:
        """The ``convert`` section as a validated ``FermiConfig`` (imports torch)."""
        from .config import FermiConfig

        data = dict(self.convert)
        if data.get("budget") is not None:  # a budget (e.g. --set convert.budget=...) replaces the share
            data.pop("target_sparsity", None)
        if isinstance(data.get("granularity"), list):
            data["granularity"] = tuple(data["granularity"])
        try:
            return FermiConfig.from_dict(data)
        except (TypeError, ValueError) as err:
            text = str(err)
            named = [k for k in data if k in text]
            first = min(named, key=text.index) if named else None
            key = f"convert.{first}" if first else "convert"
            raise RecipeError(f"{key}: {err}", key=key) from None

    @property
    def one_shot(self) -> bool:
        return self.train.steps == 0

    # -- dict / YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("applied_to")
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
        """Build and validate; unknown keys and wrong types raise :class:`RecipeError`."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a YAML mapping of sections, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key, value in data.items():
            if key not in sections:
                raise RecipeError(f"unknown key {key!r}; allowed: {list(sections)}", key=str(key))
            sub = _SECTIONS.get(key)
            if sub is not None:
                kwargs[key] = _section(sub, value, key)
            else:
                kwargs[key] = value if value is not None else _default(sections[key])
        return cls(**kwargs)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe", deep: bool = True) -> Recipe:
        """From YAML text; errors name ``source`` and the line of the offending key. ``deep`` also validates
        the ``convert`` section as a ``FermiConfig`` (which imports torch)."""
        try:
            node = yaml.compose(text, Loader=_Loader)
            data = yaml_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise RecipeError(f"{source}: malformed YAML{where}: {problem}") from None
        lines = _key_lines(node)
        try:
            recipe = cls.from_dict(data or {}, source=source)
            if deep:
                recipe.fermi_config()
            return recipe
        except RecipeError as err:
            line = lines.get(err.key or "") or lines.get((err.key or "").split(".")[0])
            raise RecipeError(f"{source}{f' line {line}' if line else ''}: {err}", key=err.key) from None

    # -- overrides ------------------------------------------------------------------------------------
    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str] | None) -> Recipe:
        """A copy with dotted keys replaced: ``{"train.steps": 10}`` or ``["train.steps=10"]`` (values are
        parsed as YAML). Structural keys are refused when this recipe was read from a checkpoint."""
        items = parse_overrides(overrides)
        if not items:
            return self
        data = self.to_dict()
        for key, value in items.items():
            parts = key.split(".")
            if self.applied_to is not None and is_structural(key) and _lookup(data, parts) != value:
                what = "--model" if key == "model.source" else key
                raise RecipeError(
                    f"cannot override {what}: {key} is a structural parameter (it fixed the shapes of the "
                    f"checkpoint in {self.applied_to}: {_lookup(data, parts)!r}, not {value!r}); runtime "
                    "parameters (anneal.*, train.*, calibration.*, eval.*, export) may be overridden, or start "
                    "from the original recipe (a bundled one or your own file) to prune differently", key=key)
            target = data
            for i, part in enumerate(parts[:-1]):
                if part not in target or not isinstance(target[part], dict):
                    raise RecipeError(f"unknown key {'.'.join(parts[:i + 1])!r} in override {key!r}; "
                                      f"sections: {list(data)}")
                target = target[part]
            if len(parts) > 1 and parts[0] != "convert" and parts[-1] not in target and parts[0] != "model":
                raise RecipeError(f"unknown key {key!r}; allowed in {parts[0]}: {list(target)}")
            target[parts[-1]] = value
        recipe = Recipe.from_dict(data, source="override")
        recipe.fermi_config()
        recipe.applied_to = self.applied_to
        return recipe

    @staticmethod
    def help() -> dict[str, str]:
        """Every dotted key with its help text and whether it is structural."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(Recipe):
            if f.metadata.get("internal"):
                continue
            sub = _SECTIONS.get(f.name)
            fields = dataclasses.fields(sub) if sub else [f]
            for g in fields:
                key = f"{f.name}.{g.name}" if sub else f.name
                tag = " [structural]" if is_structural(key) else ""
                out[key] = g.metadata.get("help", "") + tag
        out["convert.*"] = ("FermiConfig fields (see FermiConfig.help()); all structural but "
                            f"{list(RUNTIME_CONVERT)}")
        return out


_SECTIONS = {"model": ModelSection, "anneal": AnnealSection, "train": TrainSection, "calibration": CalibrationSection,
             "eval": EvalSection}


def is_structural(key: str) -> bool:
    """Whether a dotted recipe key fixes the shapes of the checkpoint (``convert.target_sparsity``: yes)."""
    parts = key.split(".")
    if parts[0] == "convert":
        return len(parts) == 1 or parts[1] not in RUNTIME_CONVERT
    if parts[0] in _SECTIONS:
        if len(parts) == 1:
            return any(f.metadata.get("structural") for f in dataclasses.fields(_SECTIONS[parts[0]]))
        known = {f.name: f for f in dataclasses.fields(_SECTIONS[parts[0]])}
        return bool(parts[1] in known and known[parts[1]].metadata.get("structural"))
    known = {f.name: f for f in dataclasses.fields(Recipe)}
    return bool(parts[0] in known and known[parts[0]].metadata.get("structural"))


_MISSING = object()


def _lookup(data: Mapping[str, Any], parts: list[str]) -> Any:
    """The value at a dotted path of a nested dict, or a marker that equals nothing when it is absent."""
    node: Any = data
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _written_by_a_run(path: Path, text: str) -> bool:
    """Whether a recipe file is the one a run wrote next to its checkpoint (by its first line, or because it
    lies in a checkpoint directory under the name the run gives it)."""
    if text.startswith(RECIPE_HEADER):
        return True
    return path.name == RECIPE_FILE and any((path.parent / n).is_file() for n in _CHECKPOINT_MARKS)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _section(cls: type, value: Any, where: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where} must be a mapping, got {value!r}", key=where)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in known:
            raise RecipeError(f"unknown key {where}.{key}; allowed: {known}", key=f"{where}.{key}")
    obj = cls(**value)
    obj.validate(where)
    return obj


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line number, from a composed YAML node."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def parse_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"an override must look like key=value (e.g. train.steps=100), got {item!r}")
        try:
            out[key.strip()] = yaml_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({err})") from None
    return out


# -- registry -----------------------------------------------------------------------------------------------
def bundled_recipes() -> dict[str, Any]:
    """The recipes shipped with fermigates: ``{name: resource}`` (``importlib.resources`` traversables)."""
    folder = resources.files("fermigates.recipes")
    return {p.name[:-5]: p for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")}


def list_recipes() -> dict[str, str]:
    """Bundled recipe names with their one-line descriptions."""
    out = {}
    for name, entry in bundled_recipes().items():
        try:
            out[name] = Recipe.from_yaml(entry.read_text(), source=name, deep=False).description
        except RecipeError as err:  # a broken bundled recipe is listed, with why
            out[name] = f"(invalid: {err})"
    return out


def load_recipe(name_or_path: str | Path | Recipe, overrides: Mapping[str, Any] | Iterable[str] | None = None
                ) -> Recipe:
    """A :class:`Recipe` from a bundled name (``"timm_cnn"``), a YAML file, a checkpoint directory written by
    ``fermigates prune`` or the ``recipe.yaml`` in it (structural overrides that change a value are then
    refused, wherever that file is read from) or a ``Recipe``, with ``overrides`` applied
    (``{"train.steps": 10}`` or ``["train.steps=10"]``)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path.with_overrides(overrides)
    path = Path(name_or_path)
    applied_to = None
    if path.is_dir():
        if not (path / RECIPE_FILE).is_file():
            raise RecipeError(f"{path} is a directory without a {RECIPE_FILE} (written by `fermigates prune`)")
        applied_to, path = str(path), path / RECIPE_FILE
    if path.suffix in (".yaml", ".yml") or applied_to:
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; bundled recipes: {sorted(bundled_recipes())}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise RecipeError(f"cannot read recipe {str(path)!r}: {err}") from None
        source = str(path)
        if applied_to is None and _written_by_a_run(path, text):
            applied_to = str(path.parent)
    else:
        recipes = bundled_recipes()
        if str(name_or_path) not in recipes:
            raise RecipeError(f"no recipe file {str(name_or_path)!r} and no bundled recipe of that name; "
                              f"bundled: {sorted(recipes)}")
        text, source = recipes[str(name_or_path)].read_text(), str(name_or_path)
    recipe = Recipe.from_yaml(text, source=source)
    recipe.applied_to = applied_to
    return recipe.with_overrides(overrides)
