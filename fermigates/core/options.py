"""One options mixin for every config dataclass: documented fields, validation on construction, a dict / YAML
round trip that refuses unknown keys."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

O = TypeVar("O", bound="Options")


def option(help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text lives in ``metadata["help"]`` (peft's convention)."""
    return field(metadata={"help": help}, **kwargs)


class Options:
    """Mixin for ``@dataclass`` configs. Subclasses implement :meth:`validate` (raise naming the field); it
    runs on construction. ``what`` names the config in error messages."""

    what: str = "options"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the field when a value has the wrong type or range."""

    @classmethod
    def _from_dict_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Turn YAML-shaped values into field values (e.g. a list into a tuple); identity by default."""
        return data

    @classmethod
    def from_dict(cls: type[O], data: dict[str, Any] | None) -> O:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.what} fields {unknown}; known fields: {sorted(known)}")
        return cls(**cls._from_dict_values(data))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls: type[O], source: str | Path) -> O:
        """From a YAML file path or a YAML string."""
        text = Path(source).read_text() if Path(str(source)).suffix in (".yaml", ".yml") else str(source)
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} YAML must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
