"""Weight files for ``--weights`` / ``--pretrained FILE``: read a state dict and load it into a model whose key
layout may differ (timm and torchvision name the same MobileNetV2 differently), leaving out a classifier of
another width. When nothing matches, the error says in two lines which keys differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: wrappers in which training scripts nest a state dict
_NESTED = ("state_dict", "model", "model_state_dict", "module")


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model in any layout fermigates knows."""


@dataclass
class WeightsLoaded:
    """How a weights file went into a model."""

    path: str
    layout: str  # "names" (keys as in the model) or "position" (same tensors in the same order, other names)
    loaded: int
    skipped: list[str] = field(default_factory=list)  # model keys left as they were (a classifier of another width)

    def notice(self) -> str | None:
        """A line for the user when the file did not load one to one, else None."""
        parts = []
        if self.layout == "position":
            parts.append(f"its keys follow another layout (torchvision's?): {self.loaded} tensors matched by "
                         "position, every shape equal")
        if self.skipped:
            parts.append(f"{', '.join(self.skipped)} kept at random init (another width in the file: the "
                         "classifier)")
        return f"--weights {self.path}: " + "; ".join(parts) if parts else None


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file (unwrapped from ``state_dict`` /
    ``model`` entries and a DataParallel ``module.`` prefix)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise WeightsError(f"weights file {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
    for _ in range(3):
        inner = next((state[k] for k in _NESTED if isinstance(state, dict) and isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: Any, path: str | Path, *, classifier: tuple[str, ...] = ()) -> WeightsLoaded:
    """Load the state dict in ``path`` into ``model``: by name when the keys match, else by position when the
    file holds the same tensors in the same order under other names (a ``torch.save`` file keeps the order of
    the state dict it saved; a ``.safetensors`` file sorts its keys, so it must match by name). Tensors of the
    modules named in ``classifier`` may differ in width (they are then left as they are). Raises :class:`WeightsError` naming
    the keys that differ when neither fits; the model is untouched then."""
    import torch

    state = read_state_dict(path)
    own = model.state_dict()
    is_head = _head_test(classifier)
    plan = _by_name(state, own, is_head)
    layout = "names"
    ordered = Path(path).suffix != ".safetensors"  # safetensors sorts its keys: their order says nothing
    if plan is None and ordered:
        plan = _by_position(state, own, is_head)
        layout = "position"
    if plan is None:
        raise WeightsError(_mismatch(path, state, own, ordered))
    mapped, skipped = plan
    with torch.no_grad():
        result = model.load_state_dict(mapped, strict=False)
    left = sorted(set(result.missing_keys) - set(skipped))
    if left or result.unexpected_keys:  # cannot happen after the plan; a guard against hooks renaming keys
        raise WeightsError(f"--weights {path}: {len(left)} model keys were not loaded (e.g. {left[:2]})")
    return WeightsLoaded(str(path), layout, len(mapped), _modules(skipped))


def _head_test(classifier: tuple[str, ...]):
    prefixes = tuple(f"{c}." for c in classifier if c)
    return lambda key: bool(prefixes) and key.startswith(prefixes)


def _by_name(state: dict, own: dict, is_head) -> tuple[dict, list[str]] | None:
    if set(state) != set(own):
        return None
    skipped = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if any(not is_head(k) for k in skipped):
        return None
    return {k: v for k, v in state.items() if k not in skipped}, skipped


def _by_position(state: dict, own: dict, is_head) -> tuple[dict, list[str]] | None:
    if len(state) != len(own):
        return None
    mapped, skipped = {}, []
    for (key, mine), theirs in zip(own.items(), state.values()):
        if tuple(mine.shape) == tuple(theirs.shape) and mine.dtype.is_floating_point == theirs.dtype.is_floating_point:
            mapped[key] = theirs
        elif is_head(key):
            skipped.append(key)
        else:
            return None
    return mapped, skipped


def _modules(keys: list[str]) -> list[str]:
    out: list[str] = []
    for key in keys:
        module = key.rpartition(".")[0] or key
        if module not in out:
            out.append(module)
    return out


def _mismatch(path: Any, state: dict, own: dict, ordered: bool = True) -> str:
    """Two lines: which keys differ by name, and where the order of shapes first differs."""
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    first = (f"{len(extra)} of the file's {len(state)} keys are not in the model (e.g. {extra[:2]}), "
             f"{len(missing)} of the model's {len(own)} are not in the file (e.g. {missing[:2]})")
    if not missing and not extra:
        bad = next(k for k in own if tuple(own[k].shape) != tuple(state[k].shape))
        first = (f"the keys match but {bad!r} is {list(state[bad].shape)} in the file, {list(own[bad].shape)} in "
                 "the model")
    pairs = list(zip(own.items(), state.items()))
    diff = next(((i, a, b) for i, (a, b) in enumerate(pairs) if tuple(a[1].shape) != tuple(b[1].shape)
                 or a[1].dtype.is_floating_point != b[1].dtype.is_floating_point), None)
    if not ordered:
        second = ("by position: not tried, a .safetensors file keeps no order (save the state dict with torch.save "
                  "to match another layout by position)")
    elif len(state) != len(own):
        second = f"by position: the file has {len(state)} tensors, the model {len(own)}"
    elif diff is not None:
        i, (key, mine), (name, theirs) = diff
        second = (f"by position: tensor #{i} is {name!r} {list(theirs.shape)} {theirs.dtype} in the file, {key!r} "
                  f"{list(mine.shape)} {mine.dtype} in the model")
    else:
        second = "by position: every shape matches, but not by name"
    return f"--weights {path} does not fit the model: {first};\n  {second} (is it another architecture or size?)"
