"""The ``--model`` specs of ``fermigates prune``: build a model from ``timm:NAME``, ``hf:PATH`` or
``py:module:factory``, with weights from the local timm / Hugging Face cache, a file or a folder, never from the
network.

:func:`check_model_spec` looks at the file system only (no torch), so a bad spec fails before anything is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data_specs import IMAGENET_MEAN, IMAGENET_STD

_logger = logging.getLogger(__name__)

#: weight files of a Hugging Face-style folder that timm's loader reads, in order of preference
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")


class PipelineInputError(ValueError):
    """The model spec, weights file or output directory given to ``fermigates prune`` cannot be used."""


@dataclass
class BuiltModel:
    """A model built from a spec, with what the data readers and the report need to know about it."""

    model: Any
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    tokenizer: Any = None
    factory: Callable[[], Any] | None = None  # rebuilds the stock model (for load_shrunk)
    #: where the weights came from: "random", "pretrained (...)", "file ...", "folder ...", "factory"
    weights: str = "random"
    #: the classifier's module names (their width may follow the data); empty when unknown
    classifier: tuple[str, ...] = ()
    #: lines the user should read (random weights, a layout mapped by position, a head left out)
    notices: list[str] = field(default_factory=list)


def check_model_spec(spec: str) -> None:
    """Fail fast (no torch) on a model spec that cannot resolve: unknown scheme, missing folder or file."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in ("timm", "hf", "py") or not rest:
        raise PipelineInputError(f"--model {spec!r}: expected timm:NAME, hf:PATH or py:module:factory")
    if scheme == "hf" and not (Path(rest) / "config.json").is_file():
        raise PipelineInputError(f"--model {spec!r}: {rest} is not a folder with a config.json (hf:PATH takes a "
                                 "local Hugging Face model folder; nothing is downloaded)")
    if scheme == "py":
        module, sep, factory = rest.rpartition(":")
        if not sep or not module or not factory:
            raise PipelineInputError(f"--model {spec!r}: expected py:module:factory or py:path/file.py:factory")
        if module.endswith(".py") and not Path(module).is_file():
            raise PipelineInputError(f"--model {spec!r}: {module} does not exist")


def check_pretrained(spec: str, pretrained: bool | str) -> None:
    """Refuse ``pretrained`` where it cannot apply, or a weights path that does not exist (no torch)."""
    if pretrained is False:
        return
    scheme = spec.partition(":")[0]
    if scheme != "timm":
        raise PipelineInputError(f"--pretrained applies to timm:NAME models; {spec!r} is built by "
                                 + ("its folder's weights (hf:PATH loads them)" if scheme == "hf"
                                    else "your factory (pass --weights FILE to load a state dict)"))
    if isinstance(pretrained, str) and not Path(pretrained).exists():
        raise PipelineInputError(f"--pretrained {pretrained!r} does not exist (give a weights file, a Hugging Face "
                                 "folder, or no value for the local timm cache)")


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable a ``py:module:factory`` spec names (imports the module, builds nothing)."""
    rest = spec.partition(":")[2]
    module_name, _, factory_name = rest.rpartition(":")
    try:
        if module_name.endswith(".py"):
            mod_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # the console script does not put the working directory on the path
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001
        raise PipelineInputError(f"--model {spec!r}: cannot import {module_name} ({type(err).__name__}: {err})") \
            from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise PipelineInputError(f"--model {spec!r}: {module_name} has no callable {factory_name!r}")
    return factory


def check_factory_kwargs(spec: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``model.kwargs`` that a ``py:`` factory's signature does not take (before anything is built)."""
    if spec.partition(":")[0] != "py":
        return
    factory = load_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and C callables: nothing to check
        return
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise PipelineInputError(f"model.kwargs {kwargs} do not fit {spec} {signature}: {err}") from None


def build_model(spec: str, kwargs: dict[str, Any] | None = None, weights: str | None = None, *,
                pretrained: bool | str = False) -> BuiltModel:
    """Build the model a spec names (``timm:NAME``, ``hf:PATH``, ``py:module:factory``), in eval mode, with
    ``pretrained`` weights (timm: the local cache, a file or a folder) and then ``weights`` (a state dict file,
    by name or by position, see :func:`fermigates.weight_files.load_weights`) loaded."""
    check_model_spec(spec)
    check_pretrained(spec, pretrained)
    kwargs = dict(kwargs or {})
    scheme, _, rest = spec.partition(":")
    if scheme == "timm":
        built = _timm(rest, kwargs, spec, pretrained)
    elif scheme == "hf":
        built = _hf(rest, kwargs, spec)
    else:
        built = _py(kwargs, spec)
    if weights:
        from .weight_files import WeightsError, load_weights

        try:
            loaded = load_weights(built.model, weights, classifier=built.classifier)
        except WeightsError as err:
            raise PipelineInputError(str(err)) from None
        built.weights = f"file {weights}"
        built.notices = [n for n in built.notices if "random weights" not in n]
        if loaded.notice():
            built.notices.append(loaded.notice())
    built.model.eval()
    return built


# -- timm ------------------------------------------------------------------------------------------------------
def _timm(name: str, kwargs: dict[str, Any], spec: str, pretrained: bool | str) -> BuiltModel:
    try:
        import timm
    except ImportError:
        raise PipelineInputError(f"--model {spec!r} needs timm: pip install 'fermigates[timm]'") from None
    if "pretrained" in kwargs:  # model.kwargs={pretrained: true}: the same as model.pretrained
        asked = kwargs.pop("pretrained")
        pretrained = pretrained if pretrained is not False else asked
    file = None
    if pretrained is not False:
        file = _local_pretrained(timm, name, pretrained, spec)
    try:
        if file is None:
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            model = _timm_pretrained(timm, name, file, kwargs)
    except PipelineInputError:
        raise
    except Exception as err:  # noqa: BLE001 - timm raises RuntimeError for unknown names, TypeError for kwargs
        raise PipelineInputError(f"--model {spec!r}: timm cannot build it ({type(err).__name__}: {err})") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    size = kwargs.get("img_size")
    if isinstance(size, int):
        input_size = (input_size[0], size, size)
    if kwargs.get("in_chans"):
        input_size = (int(kwargs["in_chans"]),) + input_size[1:]
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    built = BuiltModel(model, input_size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                       factory=lambda: timm.create_model(name, pretrained=False, **kwargs), classifier=classifier)
    if file is None:
        built.notices.append(f"timm:{name} has random weights (nothing is downloaded): --pretrained loads them from "
                             "the local timm / Hugging Face cache, --pretrained FILE or --weights FILE from a file")
    else:
        built.weights = f"pretrained ({file})"
    return built


def _local_pretrained(timm: Any, name: str, pretrained: bool | str, spec: str) -> str:
    """A local file holding ``name``'s pretrained weights: the given file, a folder's weights file, or the copy in
    the Hugging Face / torch hub cache; :class:`PipelineInputError` when there is none (nothing is downloaded)."""
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if path.is_dir():
            found = next((path / n for n in _FOLDER_WEIGHTS if (path / n).is_file()), None)
            if found is None:
                raise PipelineInputError(f"--pretrained {pretrained!r}: the folder holds none of {_FOLDER_WEIGHTS}")
            return str(found)
        return str(path)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name: timm says so when it builds
        cfg = None
    looked = []
    if cfg is not None and cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename) if try_to_load_from_cache else None
            if isinstance(hit, str):
                return hit
        looked.append(f"the Hugging Face cache ({repo})")
    if cfg is not None and cfg.url:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if cached.is_file():
            return str(cached)
        looked.append(f"torch hub's cache ({cached})")
    raise PipelineInputError(f"--pretrained: no local copy of timm:{name}'s pretrained weights (looked in "
                             f"{' and '.join(looked) or 'no cache: timm knows no weights for it'}); nothing is "
                             "downloaded: give the file with --pretrained FILE or --weights FILE")


def _timm_pretrained(timm: Any, name: str, file: str, kwargs: dict[str, Any]) -> Any:
    """timm's own loader on a local file (it adapts the classifier and the input channels); a file in another
    layout (torchvision's) goes through :func:`fermigates.weight_files.load_weights` instead."""
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": file}, **kwargs)
    except (RuntimeError, KeyError) as err:  # keys or shapes that timm's loader does not map
        _logger.info("timm's loader refused %s (%s); matching its keys by position", file, err)
    from .weight_files import WeightsError, load_weights

    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier") or ()
    try:
        load_weights(model, file, classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier))
    except WeightsError as err:
        raise PipelineInputError(str(err).replace("--weights", "--pretrained")) from None
    return model


# -- Hugging Face ----------------------------------------------------------------------------------------------
def _hf(path: str, kwargs: dict[str, Any], spec: str) -> BuiltModel:
    try:
        import transformers
    except ImportError:
        raise PipelineInputError(f"--model {spec!r} needs transformers: pip install 'fermigates[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        has_weights = any((Path(path) / n).exists() for n in ("model.safetensors", "pytorch_model.bin",
                                                              "model.safetensors.index.json"))
        model = (cls.from_pretrained(path, local_files_only=True, config=config) if has_weights
                 else (cls.from_config(config) if cls is transformers.AutoModel else cls(config)))
    except Exception as err:  # noqa: BLE001
        raise PipelineInputError(f"--model {spec!r}: transformers cannot load it ({type(err).__name__}: {err})") \
            from None
    tokenizer = None
    if any((Path(path) / n).exists() for n in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - a model without a usable tokenizer still prunes from .npz
            _logger.warning("could not load the tokenizer in %s: %s", path, err)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    heads = tuple(n for n in ("classifier", "score") if isinstance(getattr(model, n, None), _linear()))

    def factory() -> Any:
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)

    built = BuiltModel(model, tokenizer=tokenizer, factory=factory, classifier=heads,
                       weights=f"folder {path}" if has_weights else "random")
    processor = _image_processor(transformers, path)
    if processor is not None:
        built.mean, built.std, built.input_size = processor
    if not has_weights:
        built.notices.append(f"{spec} has no weights file (model.safetensors / pytorch_model.bin): the model has "
                             "random weights")
    return built


def _image_processor(transformers: Any, path: str) -> tuple[tuple, tuple, tuple] | None:
    """Mean, std and input size of an image model's ``preprocessor_config.json``, when the folder has one."""
    if not (Path(path) / "preprocessor_config.json").is_file():
        return None
    try:
        import json

        cfg = json.loads((Path(path) / "preprocessor_config.json").read_text())
        size = cfg.get("crop_size") or cfg.get("size") or {}
        side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
        return (tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD)),
                (3, int(side), int(size.get("width", side) if isinstance(size, dict) else side)))
    except Exception:  # noqa: BLE001 - an odd processor config: the readers' defaults apply
        return None


def _linear() -> type:
    from torch import nn

    return nn.Linear


# -- py: factories ---------------------------------------------------------------------------------------------
def _py(kwargs: dict[str, Any], spec: str) -> BuiltModel:
    factory = load_factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's factory: its error is an input error here
        raise PipelineInputError(f"--model {spec!r}: the factory failed with model.kwargs {kwargs} "
                                 f"({type(err).__name__}: {err})") from None
    from torch import nn

    if not isinstance(model, nn.Module):
        raise PipelineInputError(f"--model {spec!r}: the factory returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    built = BuiltModel(model, factory=lambda: factory(**kwargs), weights="factory")
    if cfg.get("input_size"):
        built.input_size = tuple(cfg["input_size"])
    if cfg.get("mean") and cfg.get("std"):
        built.mean, built.std = tuple(cfg["mean"]), tuple(cfg["std"])
    if isinstance(cfg.get("classifier"), str):
        built.classifier = (cfg["classifier"],)
    return built
