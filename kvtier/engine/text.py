"""Turning generated tokens into text: UTF-8 boundaries and stop strings."""

from __future__ import annotations

import codecs


class TextStream:
    """Accumulates token bytes and releases only text that is final.

    Text is held back while it ends in an incomplete UTF-8 character or in a prefix of a stop
    string; :meth:`push` returns what may be sent now and whether a stop string matched.
    """

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.text = ""
        """Everything released so far."""

    def push(self, data: bytes) -> tuple[str, bool]:
        self._pending += self._decoder.decode(data)
        for stop in self._stop:
            at = self._pending.find(stop)
            if at >= 0:
                out = self._pending[:at]
                self._pending = ""
                self.text += out
                return out, True
        hold = max((_overlap(self._pending, s) for s in self._stop), default=0)
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        self.text += out
        return out, False

    def finish(self) -> str:
        """Release what was held back (the generation ended without a stop string)."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        self.text += out
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
