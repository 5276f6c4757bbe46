"""Run a model's forward as a suspendable coroutine, so calibration can stop it inside a hook.

Calibration needs every batch's input to layer ``k`` before it can solve ``k``, and each batch must then go
on *with the new weights*. Re-running the whole network per layer costs ``O(layers²)`` forwards; instead
each batch's forward runs in its own thread and suspends inside the layer's hook until the main thread
says go. Exactly one thread runs at a time (handshake through queues), so there is no concurrency: only
the call stacks are kept alive. Thread-local torch state (grad mode) is set inside the thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_GO = object()
_ABORT = object()
_local = threading.local()


class Abort(BaseException):
    """Raised inside a suspended forward to unwind it (BaseException: model code rarely catches it)."""


def current() -> "Coroutine | None":
    """The coroutine whose thread is running now, or None on an ordinary thread."""
    return getattr(_local, "co", None)


class Coroutine:
    """``fn()`` in a thread that can :meth:`suspend` and be :meth:`resume`-d from the main thread."""

    def __init__(self, fn: Callable[[], Any], role: str, index: int) -> None:
        self.role, self.index = role, index
        self.pending: Any = None
        self.done = False
        self._to_co: queue.SimpleQueue = queue.SimpleQueue()
        self._to_main: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                        name=f"fermigates-calibrate-{role}-{index}")
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        _local.co = self
        if self._to_co.get() is _ABORT:
            self._to_main.put(("done", None))
            return
        try:
            fn()
            self._to_main.put(("done", None))
        except Abort:
            self._to_main.put(("done", None))
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._to_main.put(("error", exc))

    def suspend(self, payload: Any) -> None:
        """Called on the coroutine's thread: hand ``payload`` to the main thread and wait."""
        self._to_main.put(("yield", payload))
        if self._to_co.get() is _ABORT:
            raise Abort

    def resume(self) -> Any:
        """Run until the next :meth:`suspend` (returns its payload) or the end (returns None)."""
        if self.done:
            return None
        self.pending = None
        self._to_co.put(_GO)
        kind, value = self._to_main.get()
        if kind == "yield":
            self.pending = value
            return value
        self.done = True
        self._thread.join()
        if kind == "error":
            raise value
        return None

    def close(self) -> None:
        """Unwind the forward if it is still suspended (or not started) and join the thread."""
        if not self.done:
            self.pending = None
            self._to_co.put(_ABORT)
            kind, value = self._to_main.get()
            self.done = True
        self._thread.join()
