"""Workload strings (``prefill:1x128``, ``decode:1x512``, ``generate:1x128+32``) shared by every stage."""

from __future__ import annotations

import re
from dataclasses import dataclass

from compressor.errors import NaspruneError

_PATTERN = re.compile(r"^(prefill|decode|generate):(\d+)x(\d+)(?:\+(\d+))?$")


@dataclass(frozen=True, order=True)
class Workload:
    """One static inference shape.

    ``prefill``: batch x prompt length, time to first token (last-position logits + KV cache out).
    ``decode``: one new token per sequence with ``seq`` tokens already cached.
    ``generate``: prefill ``seq`` tokens then ``new_tokens`` decode steps.
    """

    kind: str
    batch: int
    seq: int
    new_tokens: int = 0

    @staticmethod
    def parse(text: str) -> Workload:
        m = _PATTERN.match(text.strip())
        if not m or (m.group(1) == "generate") != (m.group(4) is not None):
            raise NaspruneError(
                f"bad workload '{text}': use prefill:BxS, decode:BxC or generate:BxP+N (e.g. prefill:1x128)"
            )
        kind, b, s, n = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)
        if b < 1 or s < 1 or (kind == "generate" and n < 1):
            raise NaspruneError(f"bad workload '{text}': batch, length and new tokens must be >= 1")
        return Workload(kind, b, s, n)

    def __str__(self) -> str:
        base = f"{self.kind}:{self.batch}x{self.seq}"
        return base + (f"+{self.new_tokens}" if self.kind == "generate" else "")
