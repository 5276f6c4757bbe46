"""The ``--out`` directory of a run: checked before any work, built in a hidden temporary sibling, moved into
place in one rename when every step succeeded. A run that was killed (SIGKILL, a power cut) leaves its hidden
sibling behind; the next run into the same ``--out`` removes it (siblings name the host and process that made
them, and only those of processes that no longer run are removed).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from .model_specs import PipelineInputError

#: the files a run writes beside its checkpoint
REPORT_JSON = "report.json"
RUN_LOG = "run_log.json"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def resolve_out(out: str | os.PathLike) -> Path:
    """Where a run writes: ``out`` itself, or the directory a symlink ``out`` points to (written through)."""
    path = Path(out)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """The directory a run will write (see :func:`resolve_out`): it may not exist yet, be empty, or (with
    ``force``) be replaced; raise :class:`PipelineInputError` before any work otherwise."""
    given = str(out)
    path = resolve_out(out)
    absolute = path.absolute().resolve()
    cwd = Path.cwd().resolve()
    if absolute == cwd or absolute in cwd.parents or absolute == Path(absolute.anchor):
        raise PipelineInputError(f"--out {given!r} is the working directory or one above it: a run replaces --out "
                                 "as a whole, so it must be a directory of its own (e.g. --out pruned)")
    if path.exists() and not path.is_dir():
        raise PipelineInputError(f"--out {given!r} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise PipelineInputError(f"--out {given!r} exists and is not empty; choose a new directory or pass --force")
    parent = absolute.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PipelineInputError(f"--out {given!r}: cannot write into {parent}")
    return path


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?:run|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(out: Path) -> list[Path]:
    """Remove the hidden siblings of ``out`` that runs killed on this host left (their process is gone)."""
    parent = out.absolute().parent
    pattern, host = _pattern(out.name), _host()
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = pattern.match(entry.name)
            if match and match["host"] == host and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def make_temp(out: Path) -> Path:
    """A new hidden sibling of ``out`` to build the run in (with the permissions a new directory gets)."""
    parent = out.absolute().parent
    while True:
        tmp = parent / f".{out.name}.run-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            umask = os.umask(0)
            os.umask(umask)
            tmp.mkdir(mode=0o777 & ~umask)
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT / SIGTERM wait until the block ends (a rename pair is not torn apart)."""
    block = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, block)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place as ``out`` (replacing an empty or --force'd directory)."""
    with _signals_blocked():
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{_host()}-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
