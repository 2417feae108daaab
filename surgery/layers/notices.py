"""bitsandbytes' notices (a matmul slower or less precise than asked), shown once each instead of once per layer call.

Torch-free, so that the CLI can set its filters before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

# bitsandbytes' notices that concern a run (a matmul slower or less precise than asked), by the logger that emits
# them; bitsandbytes repeats them on every call of every layer
NOTICES = {
    "bitsandbytes.nn.modules": ("Input type into Linear4bit", "Embedding size"),
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
}


class OnceEach(logging.Filter):
    """A logging filter that lets each distinct message through once (and, with ``prefixes``, only those), led by
    ``label`` where one is given."""

    def __init__(self, prefixes: tuple[str, ...] = (), label: str = ""):
        super().__init__()
        self.prefixes, self.label, self.seen = prefixes, label, set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.prefixes and not message.startswith(self.prefixes):
            return False
        with self._lock:
            if message in self.seen:
                return False
            self.seen.add(message)
        if self.label:
            record.msg, record.args = f"{self.label}{message}", ()
        return True


_ONCE = OnceEach()  # what this process has shown through surgery's calls
_active = [0]  # nesting depth of notices_once
_active_lock = threading.Lock()


@contextlib.contextmanager
def notices_once() -> Iterator[None]:
    """Within the block, bitsandbytes' notices reach the log once each per process (not once per layer call).

    The filter sits on bitsandbytes' loggers only while a surgery call runs (a fine-tune's or batched view's
    forward), so calls that do not go through surgery log as bitsandbytes decides.
    """
    with _active_lock:
        _active[0] += 1
        if _active[0] == 1:
            for name in NOTICES:
                logging.getLogger(name).addFilter(_ONCE)
    try:
        yield
    finally:
        with _active_lock:
            _active[0] -= 1
            if _active[0] == 0:
                for name in NOTICES:
                    logging.getLogger(name).removeFilter(_ONCE)
