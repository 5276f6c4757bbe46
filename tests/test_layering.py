"""The layering the docs state, checked: import-linter's contracts, and what the contracts cannot see (imports
deferred into functions, private names crossing packages, shared code that names a method)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fermigates"
#: front ends may defer their imports so that ``fermigates --help`` and ``fermigates recipes`` start without torch
STARTUP_MODULES = {"fermigates.cli", "fermigates.pipeline", "fermigates.recipe", "fermigates.report_plot",
                   "fermigates.demo", "fermigates.model_specs", "fermigates.weight_files", "fermigates.heads",
                   "fermigates.evaluation", "fermigates.out_dir", "fermigates.data_specs"}
METHOD_NAMES = ("fermi", "deepr", "softdeepr")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text())
    return out


def _internal_imports(name: str, tree: ast.Module, is_package: bool):
    """``(node, target module, inside a function)`` for every ``from fermigates...`` / relative import."""
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "fermigates" or target.startswith("fermigates."):
                yield node, target, id(node) in inner


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_import_linter_contracts_are_kept_with_no_ignore_list():
    pytest.importorskip("importlinter")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert len(config["contracts"]) >= 4
    assert not any("ignore_imports" in c for c in config["contracts"]), "the contracts must hold without exceptions"
    code = ("import sys; from importlinter import configuration; configuration.configure(); "
            "from importlinter.application.use_cases import lint_imports; "
            "sys.exit(0 if lint_imports(config_filename='pyproject.toml', no_logo=True, cache_dir=None) else 1)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(config['contracts'])} kept, 0 broken" in run.stdout, run.stdout


def test_internal_imports_are_at_the_top_of_files():
    deferred = []
    for name, tree in _modules().items():
        is_package = (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists() or name == "fermigates"
        for node, target, inside in _internal_imports(name, tree, is_package):
            if inside and name not in STARTUP_MODULES:
                deferred.append(f"{name}: from {target} (line {node.lineno})")
    assert not deferred, deferred


def test_no_private_name_crosses_a_package_boundary():
    crossing = []
    for name, tree in _modules().items():
        is_package = (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists() or name == "fermigates"
        for node, target, _ in _internal_imports(name, tree, is_package):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and _package_of(target) != _package_of(name):
                crossing.append(f"{name} imports {private} from {target}")
    assert not crossing, crossing


def test_no_shared_module_names_a_method():
    """Only a method's own folder (and the registry that lists the built-in folders) names it."""
    naming = []
    for name, tree in _modules().items():
        if name.startswith(("fermigates.methods.fermi", "fermigates.methods.rewire")) or \
                name == "fermigates.methods.registry":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in METHOD_NAMES:
                naming.append(f"{name}: {node.value!r} (line {node.lineno})")
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in METHOD_NAMES
                                                     for c in node.comparators):
                naming.append(f"{name}: compares with a method name (line {node.lineno})")
    # the one default: FermiConfig(method="fermi") (a dataclass default, not a branch)
    assert naming == ["fermigates.config: 'fermi' (line %d)" % _default_line()], naming


def _default_line() -> int:
    tree = ast.parse((PACKAGE / "config.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == "fermi":
            return node.lineno
    return -1
