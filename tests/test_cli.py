import subprocess
import sys

from fermigates.cli import main


def test_recipes_lists_and_prints(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "channel50" in out and "unstructured80" in out
    assert main(["recipes", "channel50"]) == 0
    assert "granularity: channel" in capsys.readouterr().out
    assert main(["recipes", "nope"]) == 2


def test_inspect_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fermigates.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fermigates ")
