"""The README and the pages under docs/: their Python runs, their links resolve, and every benchmark result
file is accounted for. The convention (```python runs, ```python skip is shown only) is in docs/index.md."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
# a fenced block at the start of a line: its info string (language and flags) and its body
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
CHECKPOINT_FILES = {"config.json", "fermigates.json", "report.json", "run_log.json"}  # not results
MAX_SKIPPED = 3  # blocks shown but not run, over all pages: keep them rare


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(page: Path) -> list[tuple[str, str, int]]:
    """(info string, body, line number) of every fenced block of ``page``."""
    text = page.read_text()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def _python(page: Path, *, skipped: bool = False) -> list[tuple[str, int]]:
    return [(body, line) for info, body, line in _blocks(page)
            if info.split()[:1] == ["python"] and ("skip" in info.split()[1:]) == skipped]


# ------------------------------------------------------------------------------------------- code runs
@pytest.mark.parametrize("page", [p for p in PAGES if _python(p)], ids=_rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Every ```python block of a page, in order, in one namespace, in a scratch working directory."""
    from fermigates.methods.registry import METHODS, method_names

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FERMIGATES_CACHE_DIR", str(tmp_path / "cache"))  # latency tables: never the user's cache
    method_names()  # the built-in methods registered, so that a page's own method is the only one to forget
    registered = dict(METHODS)
    namespace: dict = {"__name__": f"docs:{_rel(page)}"}
    try:
        for body, line in _python(page):
            code = compile("\n" * (line - 1) + body, str(page), "exec")  # tracebacks point at the page's lines
            exec(code, namespace)
    finally:  # a method a page registers (docs/adding-a-method.md) is not left in the registry
        METHODS.clear()
        METHODS.update(registered)


def test_every_page_has_code_or_is_reference():
    """Pages that explain how to use something show it in code the tests run."""
    reference = {"docs/index.md", "docs/api.md", "docs/results.md", "docs/layout.md"}
    missing = [_rel(p) for p in PAGES if not _python(p) and _rel(p) not in reference]
    assert not missing, missing


def test_few_blocks_are_skipped():
    skipped = [f"{_rel(p)}:{line}" for p in PAGES for _, line in _python(p, skipped=True)]
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} python blocks are not run: {skipped}"
    unknown = [f"{_rel(p)}:{line} {info!r}" for p in PAGES for info, _, line in _blocks(p)
               if info.split()[:1] == ["python"] and set(info.split()[1:]) - {"skip"}]
    assert not unknown, f"python blocks take one flag, 'skip': {unknown}"


# ------------------------------------------------------------------------------------------- the README
def test_readme_setup_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    setup = re.search(r"## Set up\s+```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = setup.strip().splitlines()
    assert commands == ['pip install -e ".[dev]"', "python -m pytest"]
    for command in commands:
        assert command.replace("python -m pip", "pip") in ci


def test_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    quickstart = _python(README)[0][0]
    assert len(quickstart.strip().splitlines()) <= 16
    assert "timm.create_model" in quickstart
    assert any("transformers." in body and "from_pretrained" in body for body, _ in _python(README))
    # the first command after the set-up is the demo, and the README shows what it prints
    after_setup = text.split("## Set up", 1)[1]
    commands = [body.strip() for info, body, _ in _blocks(README) if info == "bash"]
    assert commands[1] == "fermigates demo" and after_setup.index("fermigates demo") < after_setup.index("## Quick")
    demo_output = next(body for info, body, _ in _blocks(README) if info == "" and "fermigates report" in body)
    for line in ("params", "MACs", "accuracy     dense", "after fine-tuning", "reloaded"):
        assert line in demo_output, line


def test_readme_cli_example_is_the_one_docs_cli_shows():
    """The MiniLM command line is shown twice (README, docs/cli.md); tests/test_cli.py runs the README's."""
    def bash(page):
        return [body for info, body, _ in _blocks(page) if info == "bash" and "fermigates prune" in body]

    assert bash(README) and all(block in bash(DOCS / "cli.md") for block in bash(README))


# ------------------------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, broken


def test_index_lists_every_page():
    index = (DOCS / "index.md").read_text()
    listed = {(DOCS / t).resolve() for t in re.findall(r"\]\(([^)#\s]+\.md)", index)}
    missing = [_rel(p) for p in DOCS.rglob("*.md") if p.name != "index.md" and p.resolve() not in listed]
    assert not missing, f"docs/index.md does not list {missing}"


# ------------------------------------------------------------------------------------------- results
def test_every_result_file_is_mapped_and_cited():
    """benchmarks/results/README.md names every JSON (archived or not) with the command that wrote it; every
    JSON not archived backs a table in docs/results.md."""
    mapping = (RESULTS / "README.md").read_text()
    results_page = (DOCS / "results.md").read_text()
    unmapped = [p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*.json")
                if p.relative_to(RESULTS).as_posix() not in mapping]
    assert not unmapped, f"not in benchmarks/results/README.md: {unmapped}"
    uncited = [p.name for p in RESULTS.glob("*.json") if p.name not in results_page]
    assert not uncited, f"no table in docs/results.md cites {uncited}: cite it, or git mv it to archive/"
    known = {p.name for p in RESULTS.rglob("*.json")} | CHECKPOINT_FILES
    stale = sorted(set(re.findall(r"[\w.-]+\.json", results_page)) - known)
    assert not stale, f"docs/results.md names result files that do not exist: {stale}"


def test_write_results_records_its_invocation(tmp_path, monkeypatch):
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import write_results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_x.py"), "--methods", "fg anneal", "--quick"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    path = write_results("x", [{"a": 1}], out_dir=tmp_path)
    run = json.loads(path.read_text())["invocation"]
    assert run["command"] == "OMP_NUM_THREADS=1 python benchmarks/bench_x.py --methods 'fg anneal' --quick"
    assert run["script"] == os.path.join("benchmarks", "bench_x.py")
    assert run["argv"] == ["--methods", "fg anneal", "--quick"]
    assert run["env"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": None}
    assert isinstance(run["torch_threads"], int) and run["torch_threads"] >= 1
