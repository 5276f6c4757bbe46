"""The ``fermigates`` command: inspect shrunk checkpoints, list and show bundled recipes."""

from __future__ import annotations

import argparse
import sys

from .config import bundled_recipes


def _inspect(args: argparse.Namespace) -> int:
    from .io.checkpoint import inspect_checkpoint

    print(inspect_checkpoint(args.directory))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    recipes = bundled_recipes()
    if args.name:
        if args.name not in recipes:
            print(f"no bundled recipe {args.name!r}; bundled: {sorted(recipes)}", file=sys.stderr)
            return 2
        print(recipes[args.name].read_text(), end="")
        return 0
    for name, entry in recipes.items():
        first = entry.read_text().splitlines()[0].lstrip("# ")
        print(f"{name:20s} {first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fermigates", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fermigates {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a checkpoint written by save_shrunk")
    p.add_argument("directory")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("recipes", help="list the bundled recipes, or print one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_recipes)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"fermigates {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
