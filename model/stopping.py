"""Stop strings over streamed text: cut at the first match, never emit a partial one."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Holds back the tail of the text that could still grow into a stop string.

    Text arrives in arbitrary pieces (one detokenized token at a time), so a stop string can
    straddle any number of pieces; the matcher only releases text that no stop string can
    still claim.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Add text; return what is now safe to emit. After a match, everything is dropped."""
        if self.matched:
            return ""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for s in self._stops if (i := self._pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._held_back_length()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        """Release what was held back once generation ends without a match."""
        out, self._pending = ("" if self.matched else self._pending), ""
        return out

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
