import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_setup_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    setup = re.search(r"## Set up\s+```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(setup) == 2
    for command in setup:
        assert command.replace("python -m pip", "pip") in ci


def test_readme_quickstart_runs():
    blocks = _python_blocks()
    assert blocks, "README has no python block"
    quickstart = blocks[0]
    assert len(quickstart.strip().splitlines()) <= 16
    exec(compile(quickstart, str(README), "exec"), {})
