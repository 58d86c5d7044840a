"""Workload strings (``prefill:1x128``, ``decode:1x512``, ``generate:1x128+32``) shared by every stage,
and weighted mixes of them (``prefill:1x512 + 128*decode:1x512``): see :class:`WorkloadMix`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

from compressor.core.errors import NaspruneError

_PATTERN = re.compile(r"^(prefill|decode|generate):(\d+)x(\d+)(?:\+(\d+))?$")
T = TypeVar("T")


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


# ---- weighted mixes of workloads: what a serving request (or a traffic mix) costs ------------
_MIX_SEPARATOR = re.compile(r"\s+\+\s+")  # ' + ' with space on both sides; '+N' inside generate has none
_WEIGHT = re.compile(r"^(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_GLUED = re.compile(r"(?:\s\+|\+\s)|\+\s*(?:[0-9.eE+-]*\s*\*\s*)?[a-z]")  # a member '+' without spaces round it
_MIX_HELP = "use WORKLOAD or W*WORKLOAD terms joined by ' + ' (e.g. 'prefill:1x512 + 128*decode:1x512')"


def _format_weight(weight: float) -> str:
    """Shortest text that parses back to exactly ``weight`` (``128`` not ``128.0``, ``0.3`` not ``0.30000``)."""
    return str(int(weight)) if weight.is_integer() and abs(weight) < 1e15 else repr(weight)


@dataclass(frozen=True)
class MixMember:
    """One term of a :class:`WorkloadMix`: ``weight`` runs of ``workload``."""

    workload: Workload
    weight: float = 1.0

    def __str__(self) -> str:
        return str(self.workload) if self.weight == 1.0 else f"{_format_weight(self.weight)}*{self.workload}"


@dataclass(frozen=True)
class WorkloadMix:
    """A weighted sum of workloads, the latency objective that matches how a model is served.

    Syntax: terms ``W*WORKLOAD`` (``W`` a positive number, omitted = 1) joined by `` + `` with a
    space on each side, e.g. ``prefill:1x512 + 128*decode:1x512`` (one request: a 512-token prompt,
    then 128 decode steps, measured as separate graphs) or ``0.3*generate:1x128+32 + 0.7*generate:1x1024+32``
    (a traffic mix). The spaces make it unambiguous: ``+N`` glued to ``generate:BxP`` is that
    workload's new tokens, never a new term. A plain workload is a mix of one with weight 1 and
    prints as itself, so every place that took a workload string takes a mix string unchanged.

    Expected latency of a mix = sum over terms of weight x latency(workload) (:meth:`expected`).
    """

    members: tuple[MixMember, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise NaspruneError(f"bad workload mix: it has no workload; {_MIX_HELP}")
        seen = set()
        for m in self.members:
            if not (math.isfinite(m.weight) and m.weight > 0):
                raise NaspruneError(
                    f"bad workload mix '{self}': the weight of {m.workload} must be a positive number, not {m.weight}"
                )
            if m.workload in seen:
                raise NaspruneError(
                    f"bad workload mix '{self}': {m.workload} appears twice; give it once with the summed weight"
                )
            seen.add(m.workload)

    @staticmethod
    def parse(text: str) -> WorkloadMix:
        raw = str(text).strip()
        if not raw:
            raise NaspruneError(f"bad workload mix: it is empty; {_MIX_HELP}")
        if raw.startswith("+") or raw.endswith("+"):
            raise NaspruneError(f"bad workload mix '{text}': a '+' needs a term on each side; {_MIX_HELP}")
        members = []
        for term in _MIX_SEPARATOR.split(raw):
            if _GLUED.search(term):
                raise NaspruneError(
                    f"bad workload mix '{text}': put a space on each side of a '+' that joins terms "
                    f"('+N' with no spaces is a generate workload's new tokens); {_MIX_HELP}"
                )
            weight_text, star, workload_text = term.rpartition("*")
            weight = 1.0
            if star:
                weight_text = weight_text.strip()
                if not _WEIGHT.match(weight_text):
                    raise NaspruneError(
                        f"bad workload mix '{text}': weight '{weight_text}' is not a positive number; {_MIX_HELP}"
                    )
                weight = float(weight_text)
            members.append(MixMember(Workload.parse(workload_text), weight))
        return WorkloadMix(tuple(members))

    @staticmethod
    def of(value: WorkloadMix | Workload | str) -> WorkloadMix:
        """A mix from a mix, a workload (weight 1) or mix text."""
        if isinstance(value, WorkloadMix):
            return value
        if isinstance(value, Workload):
            return WorkloadMix((MixMember(value),))
        return WorkloadMix.parse(str(value))

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return tuple(m.workload for m in self.members)

    @property
    def single(self) -> Workload | None:
        """The workload itself when the mix is one workload with weight 1 (a plain workload), else None."""
        return self.members[0].workload if len(self.members) == 1 and self.members[0].weight == 1.0 else None

    def expected(self, latency: Callable[[Workload], T]) -> T:
        """sum(weight x latency(workload)): ``latency`` may return a float or an array (one per sub-network)."""
        total = None
        for m in self.members:
            term = latency(m.workload) * m.weight
            total = term if total is None else total + term
        return total

    def __str__(self) -> str:
        return " + ".join(str(m) for m in self.members)
