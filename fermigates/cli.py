"""The fermigates command: run a recipe (prune), see it work on a bundled example (demo), inspect a
checkpoint, list recipes, print a run's report.

Exit codes: 0 success; 1 the pipeline failed while running (nothing was written to --out); 2 bad input
(recipe, --set, --model, --data, --weights, --out, a checkpoint or report that cannot be read); 130
interrupted (Ctrl-C or SIGTERM: nothing was written).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .recipe import Recipe, RecipeError, bundled_recipes, list_recipes, load_recipe, parse_overrides

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

_PRUNE_EPILOG = """\
--model:  timm:NAME (e.g. timm:resnet18)  |  hf:PATH (a local folder with config.json, a .gguf file or a folder
          with one)  |  py:module:factory or py:path/file.py:factory (called with model.kwargs)
--data:   an image folder (DIR or images:DIR; class subfolders give labels)  |  FILE.npz (x [, y]; or
          input_ids [, attention_mask, labels])  |  FILE.txt (one sample per line, tokenised with the
          model's tokenizer)  |  fashion-mnist:DIR (IDX files, or the images file itself)
          Images are resized to the model's input size (model.input_size) and normalised with its mean /
          std; a classifier of another width than the data's classes is replaced and fitted (model.head).
eval:     every run evaluates the dense model, the model after the cut and after fine-tuning on samples
          held out of --data (or --eval-data; Fashion-MNIST: its t10k files): accuracy with labels,
          perplexity for a causal LM, else the cosine of the outputs to the dense model's.
--set:    dotted recipe keys, values in YAML: --set train.steps=100 --set convert.budget=macs:0.5
          (see `fermigates recipes --keys`); structural keys of a run's recipe.yaml are refused
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C, so that a run cleans up and writes nothing."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _prune(args: argparse.Namespace) -> int:

    overrides = parse_overrides(args.set)
    if args.model:
        overrides["model.source"] = args.model  # a run's recipe refuses another architecture
    recipe = load_recipe(args.recipe, overrides=overrides)
    from .pipeline import run_recipe

    result = run_recipe(recipe, None, args.data, args.out, weights=args.weights, quiet=args.quiet,
                        force=args.force, plots=not args.no_plots, eval_data=args.eval_data,
                        pretrained=args.pretrained)
    if not args.quiet:
        _print_result(result, args.out)
    return EXIT_OK


def _print_result(result: object, out: str) -> None:
    from .report import format_summary

    print(format_summary(result.details))  # type: ignore[attr-defined]
    where = str(result.out)  # type: ignore[attr-defined]
    shown = out if os.path.realpath(out) == os.path.realpath(where) and out == where else f"{out} ({where})"
    print(f"wrote {shown}: " + ", ".join(result.files))  # type: ignore[attr-defined]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, quick=args.quick, quiet=args.quiet, force=args.force)
    if not args.quiet:
        print(result.text)
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from .io.checkpoint import inspect_checkpoint

    print(inspect_checkpoint(args.directory))
    return EXIT_OK


def _recipes(args: argparse.Namespace) -> int:

    if args.keys:
        for key, text in Recipe.help().items():
            print(f"{key:28s} {text}")
        return EXIT_OK
    recipes = bundled_recipes()
    if args.name:
        if args.name not in recipes:
            print(f"fermigates recipes: no bundled recipe {args.name!r}; bundled: {sorted(recipes)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(recipes[args.name].read_text(), end="")
        return EXIT_OK
    for name, description in list_recipes().items():
        print(f"{name:16s} {description}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    import json

    from .report import format_full, format_summary
    from .report_plot import read_run

    report, log = read_run(args.directory)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_full(report) if args.full else format_summary(report))
    if args.write:
        from .report_plot import write_report

        path = write_report(report, args.directory, log=log)
        print(f"wrote {path} and its plots", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="fermigates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("demo", help="the whole job on a bundled example, in about a minute: train a small CNN, prune "
                                    "it to half its MACs, fine-tune, save, reload, compare accuracy and speed",
                       description="Train a small CNN on synthetic 16x16 shapes (10 classes, generated from a "
                                   "fixed seed: nothing is downloaded), prune it to half its MACs with annealed "
                                   "fine-tuning, bake, save, reload the checkpoint into a fresh model and compare "
                                   "accuracy and speed before and after.")
    p.add_argument("--out", default="fermigates-demo", help="output directory (default: fermigates-demo; a previous "
                                                            "demo there is replaced)")
    p.add_argument("--quick", action="store_true", help="a few seconds: fewer samples and steps (a smoke test)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds something else")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no summary")
    p.set_defaults(func=_demo)

    p = sub.add_parser("prune", help="run a recipe: convert, fine-tune or prune one-shot, calibrate, shrink, "
                                     "evaluate, save",
                       epilog=_PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a bundled recipe name (see `fermigates recipes`), a YAML file, or a directory a "
                                  "run wrote (its recipe.yaml)")
    p.add_argument("--model", help="timm:NAME | hf:PATH | py:module:factory (default: the recipe's model.source)")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="FILE|DIR",
                   help="timm: load the pretrained weights from the local timm / Hugging Face cache (nothing is "
                        "downloaded), or from FILE / a Hugging Face folder DIR")
    p.add_argument("--weights", help="a .safetensors / .pt state dict (timm or torchvision key layout; a classifier "
                                     "of another width is left out)")
    p.add_argument("--data", required=True, help="training / calibration data (see below)")
    p.add_argument("--eval-data", help="data to evaluate on instead of samples held out of --data")
    p.add_argument("--out", required=True, help="output directory; written only when every step succeeded (a "
                                                "symlink is written through)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--no-plots", action="store_true", help="do not write report.md and its plots")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, notes or summary")
    p.set_defaults(func=_prune)

    p = sub.add_parser("inspect", help="summarise a checkpoint written by save_shrunk")
    p.add_argument("directory")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("recipes", help="list the bundled recipes, or print one")
    p.add_argument("name", nargs="?")
    p.add_argument("--keys", action="store_true", help="every recipe key with its help ([structural] marked)")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("report", help="print the report of a prune run (--write: also report.md and plots)")
    p.add_argument("directory")
    p.add_argument("--full", action="store_true", help="the per-layer tables too")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.add_argument("--write", action="store_true", help="(re)write report.md and its plots in the directory")
    p.add_argument("--no-plots", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    p.set_defaults(func=_report)
    return parser


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Error types that mean "your input is wrong" (exit 2), importing only what is already loaded."""
    errors: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError]

    errors.append(RecipeError)
    mods = sys.modules
    for module, name in (("fermigates.data_specs", "DataSpecError"), ("fermigates.model_specs", "PipelineInputError"),
                         ("fermigates.io.manifest", "CheckpointError"), ("fermigates.weight_files", "WeightsError")):
        if module in mods:
            errors.append(getattr(mods[module], name))
    return tuple(errors)


def _silence_stdout() -> None:
    """After a reader closed stdout (``| head``): send what is left to /dev/null so exiting does not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fermigates`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"fermigates {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return args.func(args)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt as err:
        why = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        wrote = "; nothing was written" if args.command in ("prune", "demo") else ""
        print(f"fermigates {args.command}: {why}{wrote}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.traceback:
            raise
        bad_input = isinstance(err, _bad_input_errors())
        if args.command in ("inspect", "report") and isinstance(err, (OSError, ValueError)):
            bad_input = True
        what = "" if bad_input else f"failed ({type(err).__name__}): "
        tail = ("" if bad_input or args.command not in ("prune", "demo")
                else "\n  nothing was written to --out; --traceback shows where")
        print(f"fermigates {args.command}: {what}{err}{tail}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()


if __name__ == "__main__":
    raise SystemExit(main())
