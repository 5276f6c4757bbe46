"""The ``fermigates`` command: run a recipe (prune), inspect a checkpoint, list recipes, write a report.

Exit codes: 0 success; 1 the pipeline failed while running (nothing was written to --out); 2 bad input
(recipe, --set, --model, --data, --weights, --out, a checkpoint that cannot be read); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

_PRUNE_EPILOG = """\
--model:  timm:NAME (e.g. timm:resnet18)  |  hf:PATH (a local folder with config.json)  |
          py:module:factory or py:path/file.py:factory (called with model.kwargs)
--data:   an image folder (DIR or images:DIR; class subfolders give labels)  |  FILE.npz (x [, y]; or
          input_ids [, attention_mask, labels])  |  FILE.txt (one sample per line, tokenised with the
          model's tokenizer)  |  fashion-mnist:DIR (IDX files, or the images file itself)
--set:    dotted recipe keys, values in YAML: --set train.steps=100 --set convert.target_sparsity=0.3
          (see `fermigates recipes --keys`); structural keys of a checkpoint's recipe.yaml are refused
"""


def _prune(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    from .pipeline import run_recipe

    result = run_recipe(recipe, args.model, args.data, args.out, weights=args.weights, quiet=args.quiet,
                        force=args.force, plots=not args.no_plots)
    if not args.quiet:
        print(result.report)
        print(f"wrote {result.out}: " + ", ".join(result.files))
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from .io.checkpoint import inspect_checkpoint

    print(inspect_checkpoint(args.directory))
    return EXIT_OK


def _recipes(args: argparse.Namespace) -> int:
    from .recipe import Recipe, bundled_recipes, list_recipes

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
    if not args.no_plots:
        from .report_plot import write_report

        path = write_report(report, args.directory, log=log)
        if not args.json:
            print(f"wrote {path} and its plots")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="fermigates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("prune", help="run a recipe: convert, fine-tune or prune one-shot, calibrate, shrink, save",
                       epilog=_PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a bundled recipe name (see `fermigates recipes`), a YAML file, or a checkpoint "
                                  "directory written by prune (its recipe.yaml)")
    p.add_argument("--model", help="timm:NAME | hf:PATH | py:module:factory (default: the recipe's model.source)")
    p.add_argument("--weights", help="a .safetensors / .pt state dict loaded strictly into the model")
    p.add_argument("--data", required=True, help="training / calibration data (see below)")
    p.add_argument("--out", required=True, help="output directory; written only when every step succeeded")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--no-plots", action="store_true", help="do not write report.md and its plots")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no summary")
    p.set_defaults(func=_prune)

    p = sub.add_parser("inspect", help="summarise a checkpoint written by save_shrunk")
    p.add_argument("directory")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("recipes", help="list the bundled recipes, or print one")
    p.add_argument("name", nargs="?")
    p.add_argument("--keys", action="store_true", help="every recipe key with its help ([structural] marked)")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("report", help="print the report of a prune run and write report.md with plots")
    p.add_argument("directory")
    p.add_argument("--full", action="store_true", help="the per-layer tables too")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.add_argument("--no-plots", action="store_true", help="print only; write no files")
    p.set_defaults(func=_report)
    return parser


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Error types that mean "your input is wrong" (exit 2), importing only what is already loaded."""
    errors: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError]
    from .recipe import RecipeError

    errors.append(RecipeError)
    mods = sys.modules
    if "fermigates.data_specs" in mods:
        errors.append(mods["fermigates.data_specs"].DataSpecError)
    if "fermigates.pipeline" in mods:
        errors.append(mods["fermigates.pipeline"].PipelineInputError)
    if "fermigates.io.manifest" in mods:
        errors.append(mods["fermigates.io.manifest"].CheckpointError)
    return tuple(errors)


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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fermigates {args.command}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.traceback:
            raise
        bad_input = isinstance(err, _bad_input_errors())
        if args.command == "inspect" and isinstance(err, (OSError, ValueError)):
            bad_input = True
        what = "" if bad_input else f"failed ({type(err).__name__}): "
        tail = "" if bad_input or args.command != "prune" else "\n  nothing was written to --out; --traceback shows where"
        print(f"fermigates {args.command}: {what}{err}{tail}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
