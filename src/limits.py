"""Instrument limits: what the device says it can do, merged with what the site allows.

A device's :class:`~stemagent.types.Capabilities` are its truth (largest field, pixels, dwell
range, longest park, whether it can park at all); a site's safety config (the agent's
``safety`` section, the bridge's ``limits``) may only be stricter. :meth:`InstrumentLimits.stricter`
merges two sets, field by field, keeping the stricter value and remembering who set it, so a
refusal can say whether the site or the device drew the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stemagent.types import Capabilities, ScanGeometry

INF = math.inf


@dataclass(frozen=True)
class InstrumentLimits:
    """Hard limits on a single command. ``max_shape_px`` is ``(rows, cols)``; ``source`` says per
    field who set the value in force (``"site"`` or ``"device"``)."""

    max_fov_A: float = INF
    max_shape_px: tuple[int, int] = (1 << 30, 1 << 30)
    min_dwell_s: float = 0.0
    max_dwell_s: float = INF
    max_park_s: float = INF
    can_park: bool = True
    source: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_capabilities(cls, caps: Capabilities) -> InstrumentLimits:
        return cls(
            max_fov_A=float(caps.max_fov_A),
            max_shape_px=(int(caps.max_shape_px[0]), int(caps.max_shape_px[1])),
            min_dwell_s=float(caps.min_dwell_s),
            max_dwell_s=float(caps.max_dwell_s),
            max_park_s=INF if caps.max_park_s is None else float(caps.max_park_s),
            can_park=bool(caps.can_park),
            source=tuple((f, "device") for f in FIELDS),
        )

    @classmethod
    def site(cls, *, max_fov_A: float, max_shape_px: int | tuple[int, int], min_dwell_s: float, max_dwell_s: float,
             max_park_s: float, can_park: bool = True) -> InstrumentLimits:
        shape = (max_shape_px, max_shape_px) if isinstance(max_shape_px, int) else max_shape_px
        return cls(float(max_fov_A), (int(shape[0]), int(shape[1])), float(min_dwell_s), float(max_dwell_s),
                   float(max_park_s), bool(can_park), tuple((f, "site") for f in FIELDS))

    def who(self, field: str) -> str:
        return dict(self.source).get(field, "site")

    def stricter(self, other: InstrumentLimits) -> InstrumentLimits:
        """Field by field the stricter of ``self`` and ``other`` (ties keep ``self``'s source)."""
        src = dict(self.source)

        def pick(field: str, mine: float, theirs: float, smaller: bool = True) -> float:
            better = theirs < mine if smaller else theirs > mine
            if better:
                src[field] = other.who(field)
                return theirs
            return mine

        rows = int(pick("max_shape_px", self.max_shape_px[0], other.max_shape_px[0]))
        cols = min(self.max_shape_px[1], other.max_shape_px[1])
        can_park = self.can_park and other.can_park
        if not other.can_park and self.can_park:
            src["can_park"] = other.who("can_park")
        return InstrumentLimits(
            max_fov_A=pick("max_fov_A", self.max_fov_A, other.max_fov_A),
            max_shape_px=(rows, cols),
            min_dwell_s=pick("min_dwell_s", self.min_dwell_s, other.min_dwell_s, smaller=False),
            max_dwell_s=pick("max_dwell_s", self.max_dwell_s, other.max_dwell_s),
            max_park_s=pick("max_park_s", self.max_park_s, other.max_park_s),
            can_park=can_park,
            source=tuple(src.items()),
        )

    def _named(self, field: str, value: object) -> str:
        return f"{field}={value}" + (" (the device's)" if self.who(field) == "device" else "")

    def check_scan(self, g: ScanGeometry) -> tuple[str, str] | None:
        """``(rule, detail)`` when ``g`` is over a limit, else None."""
        if max(g.fov_A) > self.max_fov_A:
            return "fov", f"fov_A={max(g.fov_A)} exceeds {self._named('max_fov_A', self.max_fov_A)}"
        rows, cols = g.shape_px
        if rows > self.max_shape_px[0] or cols > self.max_shape_px[1]:
            lim = self.max_shape_px[0] if self.max_shape_px[0] == self.max_shape_px[1] else self.max_shape_px
            return "pixels", f"shape_px={g.shape_px} exceeds {self._named('max_shape_px', lim)}"
        if not self.min_dwell_s <= g.dwell_s <= self.max_dwell_s:
            who = " (the device's)" if "device" in (self.who("min_dwell_s"), self.who("max_dwell_s")) else ""
            return "dwell", f"dwell_s={g.dwell_s} outside [{self.min_dwell_s}, {self.max_dwell_s}]{who}"
        return None

    def check_park(self, dwell_s: float) -> tuple[str, str] | None:
        if not self.can_park:
            return "park", "the device cannot park the beam (its capabilities say can_park=false)"
        if dwell_s > self.max_park_s:
            return "park_dwell", f"dwell_s={dwell_s} exceeds {self._named('max_park_s', self.max_park_s)}"
        return None


FIELDS = ("max_fov_A", "max_shape_px", "min_dwell_s", "max_dwell_s", "max_park_s", "can_park")
