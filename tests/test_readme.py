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


def test_readme_code_runs(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) >= 3, "README lost a python block"
    quickstart = blocks[0]
    assert len(quickstart.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)  # the save/load block writes out/
    namespace: dict = {}
    for block in blocks:  # quickstart, save/load, one-shot: one session, as a reader would run them
        namespace.setdefault("calibration_batches", None)
        if "calibration_batches" in block:
            namespace["calibration_batches"] = [namespace["x"]]
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert namespace["report"].params_after < namespace["report"].params_before
