"""Stop strings matched across token boundaries, on streamed text.

    m = StopMatcher(("\\n\\n", "END"))
    m.push("Hello\\n")   # -> ("Hello", False): "\\n" could begin "\\n\\n", so it is held back
    m.push("\\nmore")    # -> ("", True): the text stops before "\\n\\n"; the stop string is not emitted

Text that could be the start of a stop string is held until the next text proves it is not, so a
stop string split over several tokens is still found and never reaches the client. The output is
the text before the earliest stop string (OpenAI's rule: the stop string itself is excluded).
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Streams text through, holding back a possible stop-string prefix (see the module docstring)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text now safe to emit, whether a stop string was reached). After a
        stop the matcher should not be used again."""
        if not self.stops:
            return text, False
        buf = self._held + text
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self._held = ""
            return buf[:min(cuts)], True
        keep = self._possible_start(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The end of the text (no stop string came): what was held is output after all."""
        held, self._held = self._held, ""
        return held

    def _possible_start(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = buf[len(buf) - k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
