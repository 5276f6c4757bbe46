"""Run a :class:`~fermigates.recipe.Recipe` end to end: build the model, read the data (holding some out), fit the
classifier to the data, evaluate the dense model, convert and fine-tune (annealed) or prune one-shot, calibrate,
shrink, evaluate after the cut and after fine-tuning, and write the checkpoint, the report and the run log into a
directory -- all of it or nothing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data_specs import DataSpecError, check_data_spec, default_eval_spec, load_samples
from .model_specs import (
    BuiltModel,
    PipelineInputError,
    build_model,
    check_factory_kwargs,
    check_model_spec,
    check_pretrained,
)
from .out_dir import REPORT_JSON, RUN_LOG, check_out, commit, make_temp, remove_orphans
from .recipe import RECIPE_FILE, RECIPE_HEADER, Recipe

__all__ = ["BuiltModel", "PipelineInputError", "RunResult", "build_model", "check_model_spec", "run_recipe"]

_logger = logging.getLogger(__name__)

TRAIN_SAMPLES = 2048  # the most samples a fine-tune reads from --data (it cycles over them)


# -- progress and notices ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def stage(name: str, quiet: bool) -> Iterator[None]:
    """A one-step progress line for a phase without its own bar (build, read, save, export)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=name, disable=quiet, leave=True, file=sys.stderr,
               bar_format="{desc}: {elapsed}{postfix}")
    try:
        yield
        bar.set_postfix_str("done")
        bar.update(1)
    finally:
        bar.close()


def notice(text: str, quiet: bool, notes: list[str]) -> None:
    """Tell the user something they should know about the run (also kept in the report's notes)."""
    notes.append(text)
    if not quiet:
        from tqdm.auto import tqdm

        tqdm.write(f"note: {text}", file=sys.stderr)


# -- the run ---------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What :func:`run_recipe` produced: the bake's ``FermiReport``, the report as written to ``report.json``
    (with the evaluation, the notes and what was run), the training log and the files written."""

    out: Path
    report: Any
    details: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, float]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class _Data:
    train: list
    calib: list
    example: Any
    labelled: bool
    classes: int | None
    fit: list  # (inputs, labels) batches to fit a new classifier on
    eval_set: Any  # evaluation.EvalSet or None
    described: str  # what the inputs were made into (size, normalisation)


def run_recipe(recipe: Recipe, model: str | None, data: str, out: str | os.PathLike, *, weights: str | None = None,
               quiet: bool = False, force: bool = False, plots: bool = True, eval_data: str | None = None,
               pretrained: bool | str | None = None) -> RunResult:
    """Run ``recipe`` on the model spec ``model`` (else ``recipe.model.source``) and ``--data`` spec ``data``;
    write ``out/`` (checkpoint, ``report.json``, ``report.md`` + plots, ``recipe.yaml``, run log) only when
    every step succeeded. Bad inputs raise before the model is built."""
    spec = model or recipe.model.source
    if not spec:
        raise PipelineInputError("no model: pass --model timm:NAME|hf:PATH|py:module:factory or set model.source")
    check_model_spec(spec)
    pretrained = recipe.model.pretrained if pretrained is None else pretrained
    check_pretrained(spec, pretrained)
    check_factory_kwargs(spec, recipe.model.kwargs)
    check_data_spec(data, deep=True)
    eval_spec = None
    if recipe.eval.samples:
        eval_spec = eval_data or recipe.eval.data or default_eval_spec(data)
        if eval_spec:
            check_data_spec(eval_spec, deep=True)
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
    removed = remove_orphans(out_path)
    if removed:
        _logger.info("removed %d directories that killed runs left beside %s", len(removed), out_path)
    _seed(recipe.seed)
    notes: list[str] = []

    with stage(f"build {spec}", quiet):
        built = build_model(spec, recipe.model.kwargs, weights, pretrained=pretrained)
    for text in built.notices:
        notice(text, quiet, notes)
    _apply_input_size(built, recipe.model.input_size)
    d = _read_data(recipe, built, data, eval_spec, quiet)
    net = built.model
    kwargs_out = dict(recipe.model.kwargs)
    kwargs_out.pop("pretrained", None)
    if d.labelled and recipe.model.head == "auto":
        _fit_classifier(built, d, kwargs_out, spec, quiet, notes)
    _check_outputs(net, d, spec)

    from .evaluation import Evaluator, task_of, time_models

    evaluation: dict[str, Any] = {}
    evaluator = None
    if d.eval_set is not None:
        task = task_of(net, d.eval_set)
        evaluator = Evaluator(d.eval_set, task, progress=not quiet)
        evaluation = {"task": task, "on": d.eval_set.source, "samples": d.eval_set.n, "phases": {}}
        evaluation["phases"]["dense"] = {**evaluator(net, "dense"), "step": 0}
    timing = (d.eval_set.inputs[0] if d.eval_set is not None else (d.calib or d.train or [d.example])[0])
    timing = timing[0] if isinstance(timing, tuple) else timing
    dense = copy.deepcopy(net) if recipe.eval.latency else None  # timed against the result at the end

    log: list[dict[str, float]] = []
    if recipe.one_shot:
        from .oneshot import prune

        report = prune(net, d.calib or d.train[:1], config, ridge=recipe.calibration.ridge,
                       shrink=recipe.shrink, refine_steps=recipe.train.refine_steps,
                       calibrate_layers=recipe.calibration.layers, calibration=recipe.calibration.mode,
                       example_inputs=d.example, progress=not quiet, depth=recipe.depth)
        if evaluator is not None:
            evaluation["phases"]["cut"] = {**evaluator(net, "cut"), "step": 0}
    else:
        report = _fine_tune(net, config, recipe, d, log, quiet, evaluator, evaluation)
        if evaluator is not None:
            evaluation["phases"]["final"] = {**evaluator(net, "final"), "step": recipe.train.steps}
    from .io.inspect import describe_inputs, describe_text

    report.macs_inputs = describe_text(describe_inputs(d.example))
    if dense is not None and report.latency_ms is None:
        with stage("time the dense and the pruned model", quiet):
            before, after = time_models([dense, net], timing)
        import torch

        report.latency_ms = {"before": before, "after": after, "batch": _batch_size(timing),
                             "threads": torch.get_num_threads()}
    del dense
    details = report.to_dict()
    if evaluation:
        details["evaluation"] = evaluation
    details["run"] = {"model": spec, "weights": built.weights, "data": data, "inputs": d.described,
                      "steps": recipe.train.steps}
    details["notes"] = notes

    tmp = make_temp(out_path)
    try:
        files = _write(net, recipe, details, report, log, d.example, tmp, spec, kwargs_out, quiet, plots)
        commit(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunResult(out_path, report, details, log, files)


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _apply_input_size(built: BuiltModel, size: Any) -> None:
    if size is None:
        return
    if isinstance(size, int):
        channels = built.input_size[0] if built.input_size else 3
        built.input_size = (channels, size, size)
    elif len(size) == 1:
        channels = built.input_size[0] if built.input_size else 3
        built.input_size = (channels, size[0], size[0])
    else:
        built.input_size = tuple(size)


def _batch_size(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0])


def _read_data(recipe: Recipe, built: BuiltModel, data: str, eval_spec: str | None, quiet: bool) -> _Data:
    """Training, calibration and held-out batches, disjoint (a seeded shuffle, then split)."""
    from .evaluation import EvalSet

    t, cal, ev = recipe.train, recipe.calibration, recipe.eval
    # training cycles over at most TRAIN_SAMPLES samples (what fits in memory for images), calibration reads its own
    need = max(cal.samples, min(t.steps * t.batch_size, TRAIN_SAMPLES), 1)
    held = ev.samples if ev.samples and not eval_spec else 0
    read = {"input_size": built.input_size, "mean": built.mean, "std": built.std, "tokenizer": built.tokenizer,
            "seed": recipe.seed, "progress": not quiet}
    with stage(f"read {data}", quiet):
        samples = load_samples(data, limit=need + held, **read)
    objective = t.objective
    if objective == "labels" and samples.labels is None:
        raise DataSpecError(f"train.objective is 'labels' but --data {data!r} has no labels")
    labelled = samples.labels is not None and objective != "distill"
    eval_set = None
    if held:
        n_eval = min(held, int(ev.fraction * len(samples)))
        if n_eval >= 1:
            held_out, samples = samples.take(slice(0, n_eval)), samples.take(slice(n_eval, None))
            eval_set = EvalSet(*_eval_batches(held_out, ev.batch_size, labelled),
                               source=f"{n_eval:,} held-out samples of --data")
    elif eval_spec:
        with stage(f"read {eval_spec} (evaluation)", quiet):
            ev_samples = load_samples(eval_spec, limit=ev.samples, **read)
        if labelled and ev_samples.labels is None:
            raise DataSpecError(f"--eval-data {eval_spec!r} has no labels, but --data has: give labelled data")
        eval_set = EvalSet(*_eval_batches(ev_samples, ev.batch_size, labelled),
                           source=f"{len(ev_samples):,} samples of {Path(eval_spec.split(':', 1)[-1]).name}")
    train = samples.batches(t.batch_size, labels=labelled) if t.steps else []
    calib = samples.batches(cal.batch_size, cal.samples)
    first = calib[0] if calib else samples.batches(1, 1)[0]
    example = {k: v[:1] for k, v in first.items()} if isinstance(first, dict) else first[:1]
    fit = samples.batches(ev.batch_size, TRAIN_SAMPLES, labels=True) if labelled else []
    classes = samples.classes
    if labelled and eval_set is not None and eval_set.labels:
        top = max(int(y.max()) for y in eval_set.labels) + 1
        classes = max(classes or 0, top)
    return _Data(train, calib, example, labelled, classes, fit, eval_set, _inputs_text(samples, built))


def _eval_batches(samples: Any, batch_size: int, labelled: bool) -> tuple[list, list | None]:
    batches = samples.batches(batch_size, labels=labelled)
    if not labelled:
        return batches, None
    return [b[0] for b in batches], [b[1] for b in batches]


def _inputs_text(samples: Any, built: BuiltModel) -> str:
    if samples.kind in ("images", "fashion-mnist") or (samples.kind == "npz" and not isinstance(samples.inputs, dict)
                                                       and samples.inputs.dim() == 4):
        c, h, w = samples.inputs.shape[1:]
        mean = ", ".join(f"{v:.3g}" for v in built.mean[:c])
        std = ", ".join(f"{v:.3g}" for v in built.std[:c])
        return f"images {c}x{h}x{w}, normalised with mean ({mean}) / std ({std})"
    if isinstance(samples.inputs, dict):
        ids = samples.inputs.get("input_ids")
        return f"token ids, up to {ids.shape[1]} per sample" if ids is not None else "a dict of arrays"
    return f"arrays of shape {list(samples.inputs.shape[1:])}"


def _fit_classifier(built: BuiltModel, d: _Data, kwargs_out: dict[str, Any], spec: str, quiet: bool,
                    notes: list[str]) -> None:
    """Replace a classifier whose width is not the data's number of classes, and fit a new one (linear probe)."""
    from tqdm.auto import tqdm

    from .evaluation import call
    from .heads import fit_head, head_width, resize_head

    width = head_width(built.model, built.classifier)
    if width is None or not d.classes or width == d.classes:
        return
    name = resize_head(built.model, built.classifier, d.classes)
    if name is None:
        return
    if spec.startswith("timm:"):
        kwargs_out["num_classes"] = d.classes  # the checkpoint's recipe builds the head it has
    progress = lambda b: tqdm(b, desc="fit the new classifier (features)", disable=quiet, leave=False)  # noqa: E731
    accuracy = fit_head(built.model, (name,), [b[0] for b in d.fit], [b[1] for b in d.fit],
                        call=call, progress=progress)
    notice(f"the classifier '{name}' had {width} outputs and the data has {d.classes} classes: replaced it with a "
           f"{d.classes}-class one, fitted on the features of {sum(len(b[1]) for b in d.fit):,} training samples "
           f"(training accuracy {accuracy:.3f}; model.head: keep leaves a head alone)", quiet, notes)


def _check_outputs(model: Any, d: _Data, spec: str) -> None:
    """Refuse labels the model has no output for, before any training."""
    if not d.labelled or not d.classes:
        return
    import torch

    from .evaluation import call, main_output

    with torch.no_grad():
        out = main_output(call(model.eval(), d.example))
    if out.dim() == 2 and out.shape[-1] < d.classes:
        raise PipelineInputError(f"--model {spec}: the model gives {out.shape[-1]} outputs per sample but the labels "
                                 f"name {d.classes} classes; build it with {d.classes} outputs (e.g. --set "
                                 f"'model.kwargs={{num_classes: {d.classes}}}') or use model.head: auto with a "
                                 "timm / Hugging Face classifier")


def _fine_tune(model: Any, config: Any, recipe: Recipe, d: _Data, log: list[dict[str, float]], quiet: bool,
               evaluator: Any, evaluation: dict[str, Any]) -> Any:
    """Convert, fine-tune with :func:`fermigates.fine_tune` and the method's optimizer (cross-entropy on the
    labels when the batches carry them, else distillation toward the original model), then bake. The model is
    evaluated the moment its decisions freeze (after the cut) when ``evaluator`` is given."""
    import torch

    from .bake import convert_from_fermi
    from .convert import convert_to_fermi
    from .finetune import fine_tune
    from .methods.registry import get_method

    convert_to_fermi(model, config, example_inputs=d.example, progress=not quiet)
    method = get_method(config.method)
    t, a = recipe.train, recipe.anneal
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[t.optimizer]
    if method.anneals:
        anneal: Any = {"temperature": tuple(a.temperature), "schedule": a.schedule,
                       "sparsity_schedule": a.sparsity_schedule, "ramp": a.ramp, "sparsity_weight": a.sparsity_weight}
        extra = {"init": a.init, "bake_when_decided": a.bake_when_decided}
    else:  # the method's own optimizer with its defaults (the anneal section was checked to be untouched)
        anneal, extra = True, {}
    cut: dict[str, Any] = {}

    def evaluate_cut(net: Any, step: int) -> None:
        if evaluator is not None:
            cut.update(evaluator(net, "cut"), step=step)

    result = fine_tune(model, d.train, steps=t.steps, lr=t.lr, weight_decay=t.weight_decay,
                       optimizer=optimizer if method.wraps_optimizer else None, anneal=anneal,
                       calibration_data=d.calib or None, log_every=max(1, t.steps // 50), progress=not quiet,
                       on_decided=evaluate_cut, **extra)
    log.extend(result.rows)
    model.eval()
    if result.report is not None:  # baked when the decisions froze, then fine-tuned small
        report = result.report
    else:
        report = convert_from_fermi(model, shrink=recipe.shrink, calibration_data=d.calib or None,
                                    ridge=recipe.calibration.ridge, calibrate_layers=recipe.calibration.layers,
                                    example_inputs=d.example, progress=not quiet)
    if evaluator is not None:
        if not cut:  # the decisions never froze during the run: the baked model is the cut one
            cut.update(evaluator(model, "cut"), step=t.steps)
        evaluation["phases"]["cut"] = cut
    return report


def _check_method_sections(recipe: Recipe, config: Any) -> None:
    """Refuse an ``anneal`` section for a method whose optimizer does not anneal (it would be ignored)."""
    from .methods.registry import get_method
    from .recipe import AnnealSection

    if recipe.train.steps and not get_method(config.method).anneals and recipe.anneal != AnnealSection():
        raise PipelineInputError(f"the recipe's anneal section applies to methods that anneal their decisions; "
                                 f"convert.method={config.method!r} trains with its own optimizer: remove the "
                                 "anneal section (or its changed keys)")


def _write(model: Any, recipe: Recipe, details: dict[str, Any], report: Any, log: list, example: Any, tmp: Path,
           spec: str, kwargs_out: dict[str, Any], quiet: bool, plots: bool) -> list[str]:
    from .io.checkpoint import save_shrunk

    with stage("save model.safetensors", quiet):
        save_shrunk(model, tmp, example_inputs=example)
    if "onnx" in recipe.export:
        from .io.onnx import export_onnx

        with stage("export model.onnx", quiet):
            export_onnx(model, example, tmp / "model.onnx")
    data = recipe.to_dict()
    data["model"]["source"] = spec
    data["model"]["kwargs"] = kwargs_out
    (tmp / RECIPE_FILE).write_text(f"{RECIPE_HEADER}\n" + Recipe.from_dict(data).to_yaml())
    (tmp / REPORT_JSON).write_text(json.dumps(details, indent=1, default=str) + "\n")
    if log:
        (tmp / RUN_LOG).write_text(json.dumps(log, indent=1) + "\n")
    if plots:
        from .report_plot import PlotExtraMissing, write_report

        try:
            with stage("write report.md and plots", quiet):
                write_report(details, tmp, log=log or None)
        except PlotExtraMissing as err:
            _logger.warning("%s; report.md not written", err)
    return sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
