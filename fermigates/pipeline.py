"""Run a :class:`~fermigates.recipe.Recipe` end to end: build the model, read the data, convert, fine-tune
(annealed) or prune one-shot, calibrate, shrink, and write the checkpoint, the report and the run log into a
directory -- all of it or nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import RECIPE_FILE, Recipe

_logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
TRAIN_SAMPLES = 2048  # the most samples a fine-tune reads from --data (it cycles over them)
RUN_LOG = "run_log.json"


class PipelineInputError(ValueError):
    """The model spec, weights file or output directory given to :func:`run_recipe` cannot be used."""


@dataclass
class BuiltModel:
    """A model built from a spec, with what the data readers need to know about it."""

    model: Any
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    tokenizer: Any = None
    factory: Callable[[], Any] | None = None  # rebuilds the stock model (for load_shrunk)


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


def build_model(spec: str, kwargs: dict[str, Any] | None = None, weights: str | None = None) -> BuiltModel:
    """Build the model a spec names (``timm:NAME``, ``hf:PATH``, ``py:module:factory``), in eval mode, with
    ``weights`` (a .safetensors / .pt state dict) loaded strictly."""
    check_model_spec(spec)
    kwargs = dict(kwargs or {})
    scheme, _, rest = spec.partition(":")
    built = {"timm": _timm, "hf": _hf, "py": _py}[scheme](rest, kwargs, spec)
    if weights:
        _load_weights(built.model, weights)
    built.model.eval()
    return built


def _timm(name: str, kwargs: dict[str, Any], spec: str) -> BuiltModel:
    try:
        import timm
    except ImportError:
        raise PipelineInputError(f"--model {spec!r} needs timm: pip install 'fermigates[timm]'") from None
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm raises RuntimeError for unknown names, TypeError for kwargs
        raise PipelineInputError(f"--model {spec!r}: timm cannot build it ({err})") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = kwargs.get("img_size")
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    if isinstance(size, int):
        input_size = (input_size[0], size, size)
    return BuiltModel(model, input_size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                      tuple(cfg.get("std", (0.229, 0.224, 0.225))),
                      factory=lambda: timm.create_model(name, pretrained=False, **kwargs))


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
    return BuiltModel(model, tokenizer=tokenizer, factory=lambda: cls.from_config(config)
                      if hasattr(cls, "from_config") and cls is transformers.AutoModel else cls(config))


def _py(rest: str, kwargs: dict[str, Any], spec: str) -> BuiltModel:
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
    model = factory(**kwargs)
    from torch import nn

    if not isinstance(model, nn.Module):
        raise PipelineInputError(f"--model {spec!r}: {factory_name}() returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
    return BuiltModel(model, factory=lambda: factory(**kwargs))


def _load_weights(model: Any, weights: str) -> None:
    import torch

    path = Path(weights)
    if not path.is_file():
        raise PipelineInputError(f"--weights {weights!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise PipelineInputError(f"--weights {weights!r}: cannot read it ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PipelineInputError(f"--weights {weights!r} does not fit the model: {err}") from None


# -- progress -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stage(name: str, quiet: bool) -> Iterator[None]:
    """A one-step progress bar for a long call without its own (trace, save, export)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=name, disable=quiet, leave=True, file=sys.stderr,
               bar_format="{desc}: {elapsed}{postfix}")
    try:
        yield
        bar.set_postfix_str("done")
        bar.update(1)
    finally:
        bar.close()


# -- the run --------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What :func:`run_recipe` produced."""

    out: Path
    report: Any
    log: list[dict[str, float]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """``out`` may not exist yet, be empty, or (with ``force``) be replaced; raise before any work otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise PipelineInputError(f"--out {str(out)!r} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise PipelineInputError(f"--out {str(out)!r} exists and is not empty; choose a new directory or pass --force")
    parent = path.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PipelineInputError(f"--out {str(out)!r}: cannot write into {parent}")
    return path


def run_recipe(recipe: Recipe, model: str | None, data: str, out: str | os.PathLike, *, weights: str | None = None,
               quiet: bool = False, force: bool = False, plots: bool = True) -> RunResult:
    """Run ``recipe`` on the model spec ``model`` (else ``recipe.model.source``) and ``--data`` spec ``data``;
    write ``out/`` (checkpoint, ``report.json``, ``report.md`` + plots, ``recipe.yaml``, run log) only when
    every step succeeded. Bad inputs raise before the model is built."""
    from .data_specs import check_data_spec

    spec = model or recipe.model.source
    if not spec:
        raise PipelineInputError("no model: pass --model timm:NAME|hf:PATH|py:module:factory or set model.source")
    check_model_spec(spec)
    check_data_spec(data)
    out_path = check_out(out, force)
    weights = weights or recipe.model.weights
    if weights and not Path(weights).is_file():
        raise PipelineInputError(f"--weights {weights!r} does not exist")
    config = recipe.fermi_config()
    _check_method_sections(recipe, config)
    if "onnx" in recipe.export:
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise PipelineInputError(f"the recipe exports ONNX, which needs {missing}: pip install 'fermigates[onnx]' "
                                     "(or --set 'export=[safetensors]')")

    with stage(f"build {spec}", quiet):
        built = build_model(spec, recipe.model.kwargs, weights)
    train_batches, calib_batches, example, labels = _read_data(recipe, built, data, quiet)
    net = built.model
    log: list[dict[str, float]] = []
    if recipe.one_shot:
        from .oneshot import prune

        report = prune(net, calib_batches or train_batches[:1], config, ridge=recipe.calibration.ridge,
                       shrink=recipe.shrink, refine_steps=recipe.train.refine_steps,
                       calibrate_layers=recipe.calibration.layers, calibration=recipe.calibration.mode,
                       example_inputs=example, progress=not quiet)
    else:
        report = _fine_tune(net, config, recipe, train_batches, calib_batches, example, labels, log, quiet)
    from .io.inspect import describe_inputs

    report.macs_inputs = _shape_text(describe_inputs(example))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.absolute().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        files = _write(net, recipe, report, log, example, tmp, spec, quiet, plots)
        _commit(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunResult(out_path, report, log, files)


def _check_method_sections(recipe: Recipe, config: Any) -> None:
    """Refuse an ``anneal`` section for a method whose optimizer does not anneal (it would be ignored)."""
    from .methods.registry import get_method
    from .recipe import AnnealSection

    if recipe.train.steps and not get_method(config.method).anneals and recipe.anneal != AnnealSection():
        raise PipelineInputError(f"the recipe's anneal section applies to methods that anneal their decisions; "
                                 f"convert.method={config.method!r} trains with its own optimizer: remove the "
                                 "anneal section (or its changed keys)")


def _read_data(recipe: Recipe, built: BuiltModel, data: str, quiet: bool) -> tuple[list, list, Any, bool]:
    from .data_specs import load_samples

    # training cycles over at most TRAIN_SAMPLES samples (what fits in memory for images), calibration reads its own
    train_samples = min(recipe.train.steps * recipe.train.batch_size, TRAIN_SAMPLES)
    with stage(f"read {data}", quiet):
        samples = load_samples(data, limit=max(recipe.calibration.samples, train_samples, 1),
                               input_size=built.input_size, mean=built.mean, std=built.std,
                               tokenizer=built.tokenizer)
    objective = recipe.train.objective
    labels = samples.labels is not None and objective != "distill"
    if objective == "labels" and samples.labels is None:
        from .data_specs import DataSpecError

        raise DataSpecError(f"train.objective is 'labels' but --data {data!r} has no labels")
    train = samples.batches(recipe.train.batch_size, labels=labels) if recipe.train.steps else []
    calib = samples.batches(recipe.calibration.batch_size, recipe.calibration.samples)
    first = calib[0] if calib else samples.batches(1, 1)[0]
    example = {k: v[:1] for k, v in first.items()} if isinstance(first, dict) else first[:1]
    return train, calib, example, labels


def _fine_tune(model: Any, config: Any, recipe: Recipe, train: list, calib: list, example: Any, labels: bool,
               log: list[dict[str, float]], quiet: bool) -> Any:
    """Convert, fine-tune with :func:`fermigates.fine_tune` while the annealer anneals (cross-entropy on the
    labels when the batches carry them, else distillation toward the original model), then bake."""
    import torch

    from .bake import convert_from_fermi
    from .convert import convert_to_fermi
    from .finetune import fine_tune
    from .methods.registry import get_method

    convert_to_fermi(model, config, example_inputs=example, progress=not quiet)
    method = get_method(config.method)
    t, a = recipe.train, recipe.anneal
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[t.optimizer]
    if method.anneals:
        anneal = {"temperature": tuple(a.temperature), "schedule": a.schedule,
                  "sparsity_schedule": a.sparsity_schedule, "ramp": a.ramp, "sparsity_weight": a.sparsity_weight}
        extra = {"init": a.init, "bake_when_decided": a.bake_when_decided}
    else:  # the method's own optimizer with its defaults (the anneal section was checked to be untouched)
        anneal, extra = True, {}
    result = fine_tune(model, train, steps=t.steps, lr=t.lr, optimizer=optimizer if method.wraps_optimizer else None,
                       weight_decay=t.weight_decay, anneal=anneal, log_every=max(1, t.steps // 50),
                       progress=not quiet, calibration_data=calib or None, **extra)
    log.extend(result.rows)
    model.eval()
    if result.report is not None:  # baked when the decisions froze, then fine-tuned small
        return result.report
    return convert_from_fermi(model, shrink=recipe.shrink, calibration_data=calib or None,
                              ridge=recipe.calibration.ridge, calibrate_layers=recipe.calibration.layers,
                              example_inputs=example, progress=not quiet)


def _shape_text(desc: Any) -> str:
    if isinstance(desc, dict) and "shape" in desc:
        return f"{desc['dtype']}[{', '.join(map(str, desc['shape']))}]"
    if isinstance(desc, dict):
        return "{" + ", ".join(f"{k}: {_shape_text(v)}" for k, v in desc.items()) + "}"
    if isinstance(desc, list):
        return "(" + ", ".join(_shape_text(v) for v in desc) + ")"
    return str(desc)


def _write(model: Any, recipe: Recipe, report: Any, log: list, example: Any, tmp: Path, spec: str, quiet: bool,
           plots: bool) -> list[str]:
    from .io.checkpoint import save_shrunk

    with stage("save safetensors", quiet):
        save_shrunk(model, tmp, example_inputs=example)
    if "onnx" in recipe.export:
        from .io.onnx import export_onnx

        with stage("export ONNX", quiet):
            export_onnx(model, example, tmp / "model.onnx")
    data = recipe.to_dict()
    data["model"]["source"] = spec
    (tmp / RECIPE_FILE).write_text("# the recipe that produced this checkpoint (fermigates prune)\n"
                                   + Recipe.from_dict(data).to_yaml())
    report.to_json(str(tmp / REPORT_JSON))
    if log:
        (tmp / RUN_LOG).write_text(json.dumps(log, indent=1) + "\n")
    if plots:
        from .report_plot import PlotExtraMissing, write_report

        try:
            write_report(report.to_dict(), tmp, log=log or None)
        except PlotExtraMissing as err:
            _logger.warning("%s; report.md not written", err)
    return sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place as ``out`` (replacing an empty or --force'd directory)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
