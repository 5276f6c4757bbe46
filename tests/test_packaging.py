import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_lean():
    code = "import sys, fermigates; print(sorted(m for m in ('timm', 'transformers', 'onnxruntime', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_public_api_is_exported():
    import fermigates

    for name in fermigates.__all__:
        assert hasattr(fermigates, name), name
    for name in ("convert_to_fermi", "convert_from_fermi", "FermiAnnealer", "FermiConfig", "compute_sparsity"):
        assert name in fermigates.__all__


def test_wheel_ships_converters_and_recipes_inside_the_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("fermigates-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"fermigates", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    assert "fermigates/core/registry.py" in names
    assert "fermigates/converters/hf_attention.py" in names
    assert any(n.startswith("fermigates/recipes/") and n.endswith(".yaml") for n in names)
    # every source module ships (a subpackage missing from pyproject's package list would be dropped)
    sources = {f"fermigates/{p.relative_to(ROOT / 'fermigates').as_posix()}"
               for p in (ROOT / "fermigates").rglob("*.py")}
    assert "fermigates/methods/fermi/gates.py" in sources
    assert sources <= set(names), sorted(sources - set(names))
    assert not any(n.startswith(("converters/", "recipes/", "tests/", "benchmarks/")) for n in names)


def test_bundled_recipes_load():
    import fermigates as fg

    for name in fg.list_recipes():
        recipe = fg.load_recipe(name)
        assert isinstance(recipe, fg.Recipe) and isinstance(recipe.fermi_config(), fg.FermiConfig)
    assert fg.load_recipe("channel50").fermi_config().granularity == "channel"
    assert {"timm_cnn", "timm_vit", "bert_encoder", "llama_decoder"} <= set(fg.list_recipes())


def test_shared_subsystems_do_not_import_a_method():
    """surgery / calibration / io serve every method: none of them imports one at module level."""
    import ast

    offenders = []
    for sub in ("surgery", "calibration", "io"):
        for path in (ROOT / "fermigates" / sub).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ImportFrom) and "methods" in (node.module or ""):
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module}")
    assert not offenders, offenders


def test_no_public_name_is_shadowed_by_a_submodule():
    """``import fermigates.<x>`` sets the attribute ``fermigates.<x>`` to the submodule: a lazily exported
    function of the same name (``fg.prune``) would then silently become a module."""
    import importlib.util

    import fermigates

    clashes = [n for n in fermigates._EXPORTS if importlib.util.find_spec(f"fermigates.{n}") is not None]
    assert not clashes, clashes
