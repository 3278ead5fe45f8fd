"""The look-alike families as side-view silhouettes: 8 families x 3 binary design choices = 64 classes.

A family is a function of its three design bits that builds a `_Shape`: parts (cylinders, tapers, blades...) along
the object's axis, each with a palette role, sampled into a width profile that `fewshot_lkca.data.lookalike`
renders under pose, lighting and clutter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FAMILIES", "HANDLE", "BODY", "METAL", "ACCENT", "DARK", "EDGE", "N_ROLES"]

# Part roles: the index into an instance's palette (0 = not the object).
HANDLE, BODY, METAL, ACCENT, DARK, EDGE = range(1, 7)
N_ROLES = 7
PROFILE_SAMPLES = 512  # samples of the width profile along the axis: sub-pixel at 2x supersampling of 128 px

@dataclass
class _Shape:
    """A side view in the object's axis frame: u runs along the axis, v across it, both in length units."""

    top: list[tuple[float, float]] = field(default_factory=list)  # (u, v) outline of the +v side
    bottom: list[tuple[float, float]] = field(default_factory=list)  # (u, v) outline of the -v side
    parts: list[tuple[float, float, int]] = field(default_factory=list)  # (u0, u1, role)
    stripes: list[tuple[float, float, float, float, int]] = field(default_factory=list)  # (u0, u1, f0, f1, role)
    rects: list[tuple[float, float, float, float, int]] = field(default_factory=list)  # (u0, u1, v0, v1, role)
    dots: list[tuple[float, float, float, int]] = field(default_factory=list)  # (u, v, radius, role)
    u: float = 0.0  # where the next segment starts

    def segment(self, length: float, top, bottom=None, role: int = BODY, steps: int = 8) -> tuple[float, float]:
        """Append a segment; `top`/`bottom` map s in [0, 1] to the outline (bottom defaults to -top)."""
        bottom = bottom or (lambda s: -top(s))
        for s in np.linspace(0.0, 1.0, steps):
            self.top.append((self.u + s * length, float(top(s))))
            self.bottom.append((self.u + s * length, float(bottom(s))))
        start, self.u = self.u, self.u + length
        self.parts.append((start, self.u, role))
        return start, self.u

    def cylinder(self, length: float, w0: float, w1: float | None = None, role: int = BODY) -> tuple[float, float]:
        w1 = w0 if w1 is None else w1
        return self.segment(length, lambda s: w0 + (w1 - w0) * s, role=role, steps=2)

    def bulge(self, length: float, w0: float, w1: float, amp: float, role: int) -> tuple[float, float]:
        return self.segment(length, lambda s: w0 + (w1 - w0) * s + amp * math.sin(math.pi * s), role=role)

    def cap(self, length: float, w: float, role: int, tail: bool = False) -> tuple[float, float]:
        """Elliptic end cap, closing towards the tip (or opening from the tail)."""
        if tail:
            return self.segment(length, lambda s: w * math.sqrt(max(0.0, 1 - (1 - s) ** 2)), role=role)
        return self.segment(length, lambda s: w * math.sqrt(max(0.0, 1 - s**2)), role=role)

    def rings(self, start: float, end: float, count: int, width: float, role: int = DARK) -> None:
        """`count` full-width bands spread evenly over [start, end]."""
        for centre in np.linspace(start, end, count + 2)[1:-1]:
            self.stripes.append((centre - width / 2, centre + width / 2, 0.0, 1.0, role))

    def profile(self) -> dict[str, np.ndarray]:
        """Sample the outline on a fixed grid of the normalised axis u in [0, 1)."""
        length = self.u
        grid = (np.arange(PROFILE_SAMPLES) + 0.5) / PROFILE_SAMPLES * length
        top_u, top_v = np.array(self.top).T
        bot_u, bot_v = np.array(self.bottom).T
        role = np.zeros(PROFILE_SAMPLES, dtype=np.int64)
        for u0, u1, r in self.parts:
            role[(grid >= u0) & (grid < u1)] = r
        scale = 1.0 / length
        extents = [abs(v) for _, v in self.top + self.bottom]
        extents += [max(abs(c), abs(d)) for _, _, c, d, _ in self.rects] + [abs(v) + r for _, v, r, _ in self.dots]
        return {
            "reach": max(extents) * scale,  # widest point off the axis, to bound the pixels to render
            "top": np.interp(grid, top_u, top_v) * scale,
            "bottom": np.interp(grid, bot_u, bot_v) * scale,
            "role": role,
            "stripes": np.array([(a * scale, b * scale, f0, f1, r) for a, b, f0, f1, r in self.stripes]).reshape(-1, 5),
            "rects": np.array(
                [(a * scale, b * scale, c * scale, d * scale, r) for a, b, c, d, r in self.rects]
            ).reshape(-1, 5),
            "dots": np.array([(a * scale, b * scale, c * scale, r) for a, b, c, r in self.dots]).reshape(-1, 4),
        }


# Families: each maps three binary design choices (a, b, c) to a silhouette of length about 1.


def _baton(a: int, b: int, c: int) -> _Shape:
    """a: grip 0.28 / 0.42; b: one tapered shaft / two telescoping sections; c: ball tip / rounded end."""
    s = _Shape()
    s.cap(0.03, 0.05, DARK, tail=True)
    g0, g1 = s.cylinder((0.28, 0.42)[a], 0.042, role=HANDLE)
    s.rings(g0, g1, 5, 0.012)
    rest = 0.95 - s.u
    if b == 0:
        s.cylinder(rest, 0.034, 0.026, role=BODY)
    else:
        s.cylinder(rest * 0.5, 0.036, role=BODY)
        s.cylinder(0.015, 0.04, role=METAL)
        s.cylinder(rest * 0.5 - 0.015, 0.022, role=BODY)
    if c == 0:
        s.cylinder(0.02, 0.02, role=METAL)
        s.dots.append((s.u + 0.015, 0.0, 0.04, METAL))
        s.u += 0.05  # the ball is a dot beyond the outline; count it in the length
    else:
        s.cap(0.04, (0.026, 0.022)[b], BODY)
    return s


def _flashlight(a: int, b: int, c: int) -> _Shape:
    """a: 2 / 6 knurl rings; b: head flares to 0.06 / 0.09; c: conical head / short neck and straight head."""
    s = _Shape()
    s.cap(0.015, 0.05, DARK, tail=True)
    s.cylinder(0.06, 0.05, role=DARK)
    b0, b1 = s.cylinder(0.5, 0.042, role=BODY)
    s.rings(b0 + 0.05, b1 - 0.05, (2, 6)[a], 0.022)
    head = (0.06, 0.09)[b]
    if c == 0:
        s.cylinder(0.32, 0.042, head, role=BODY)
    else:
        s.cylinder(0.06, 0.042, head, role=BODY)
        s.cylinder(0.26, head, role=BODY)
    s.cylinder(0.03, head + 0.004, role=METAL)  # bezel
    return s


def _knife(a: int, b: int, c: int) -> _Shape:
    """a: handle 0.32 / 0.46; b: bolster / cross-guard; c: drop point / clip point."""
    s = _Shape()
    s.cap(0.025, 0.045, HANDLE, tail=True)
    h0, h1 = s.bulge((0.32, 0.46)[a], 0.045, 0.04, 0.008, HANDLE)
    s.dots += [(h0 + 0.25 * (h1 - h0), 0.0, 0.011, METAL), (h0 + 0.7 * (h1 - h0), 0.0, 0.011, METAL)]
    s.cylinder(0.025, (0.045, 0.09)[b], role=METAL)
    spine, edge = 0.035, -0.048

    def drop_top(t: float) -> float:
        return spine if t < 0.6 else spine - (spine + 0.02) * ((t - 0.6) / 0.4) ** 1.6

    def clip_top(t: float) -> float:
        if t < 0.5:
            return spine
        if t < 0.75:  # the concave clip: a steep straight cut down the spine
            return spine - (spine - 0.0) * (t - 0.5) / 0.25
        return 0.0 - 0.02 * (t - 0.75) / 0.25

    def belly(t: float) -> float:
        return edge if t < 0.55 else edge + (edge * -1 - 0.02) * ((t - 0.55) / 0.45) ** 2.2

    b0, b1 = s.segment(0.95 - s.u, (drop_top, clip_top)[c], belly, role=METAL, steps=24)
    s.stripes.append((b0, b1, 0.0, 0.3, EDGE))
    return s


def _screwdriver(a: int, b: int, c: int) -> _Shape:
    """a: handle 0.30 / 0.44; b: shaft 0.011 / 0.020; c: flat / Phillips (pointed) tip."""
    s = _Shape()
    s.cap(0.03, 0.05, HANDLE, tail=True)
    h0, h1 = s.bulge((0.30, 0.44)[a], 0.05, 0.042, 0.012, HANDLE)
    s.stripes += [(h0, h1 - 0.03, 0.22, 0.32, DARK), (h0, h1 - 0.03, 0.68, 0.78, DARK)]
    s.stripes.append((h1 - 0.03, h1, 0.0, 1.0, ACCENT))
    s.cylinder(0.035, 0.03, 0.018, role=METAL)
    shaft = (0.011, 0.02)[b]
    s.cylinder(0.9 - s.u, shaft, role=METAL)
    if c == 0:
        s.cylinder(0.05, shaft, shaft * 1.8, role=METAL)
        s.cylinder(0.012, shaft * 1.8, shaft * 1.4, role=METAL)
    else:
        s.cylinder(0.07, shaft, 0.002, role=METAL)
    return s


def _pen(a: int, b: int, c: int) -> _Shape:
    """a: no clip / pocket clip; b: plain / ringed rubber grip; c: long cone / short cone and needle tip."""
    s = _Shape()
    s.cap(0.02, 0.018, METAL, tail=True)
    s.cylinder(0.02, 0.018, role=METAL)
    b0, b1 = s.cylinder(0.52, 0.03, role=BODY)
    if a == 1:
        s.rects.append((b0 + 0.02, b0 + 0.27, 0.031, 0.05, METAL))
        s.dots.append((b0 + 0.255, 0.04, 0.012, METAL))
    s.cylinder(0.015, 0.031, role=METAL)
    g0, g1 = s.cylinder(0.2, (0.027, 0.031)[b], role=(BODY, HANDLE)[b])
    if b == 1:
        s.rings(g0, g1, 4, 0.015)
    if c == 0:
        s.cylinder(0.14, 0.027, 0.007, role=BODY)
        s.cylinder(0.02, 0.006, 0.002, role=METAL)
    else:
        s.cylinder(0.07, 0.027, 0.008, role=BODY)
        s.cylinder(0.05, 0.004, role=METAL)
    return s


def _tube(a: int, b: int, c: int) -> _Shape:
    """a: cap 0.10 / 0.20; b: no neck / tapered neck; c: one wide label band / two narrow bands."""
    s = _Shape()
    s.cap(0.04, 0.065, BODY, tail=True)
    t0, t1 = s.cylinder(0.72 - (0.10, 0.20)[a] - 0.07 * b, 0.065, role=BODY)
    if c == 0:
        s.stripes.append((t0 + 0.25 * (t1 - t0), t0 + 0.65 * (t1 - t0), 0.0, 1.0, HANDLE))
    else:
        s.rings(t0, t1, 2, 0.03, DARK)
    cap_w = 0.05
    if b == 1:
        s.cylinder(0.07, 0.065, 0.035, role=BODY)
        cap_w = 0.04
    s.cylinder((0.10, 0.20)[a], cap_w, role=ACCENT)
    s.cap(0.03, cap_w, ACCENT)
    return s


def _chisel(a: int, b: int, c: int) -> _Shape:
    """a: parallel / widening blade; b: blade 0.028 / 0.042; c: short / long bevel."""
    s = _Shape()
    s.cap(0.025, 0.04, HANDLE, tail=True)
    s.bulge(0.37, 0.04, 0.046, 0.01, HANDLE)
    s.cylinder(0.04, 0.047, role=METAL)
    s.cylinder(0.04, 0.013, role=METAL)
    width = (0.028, 0.042)[b]
    s.cylinder(0.02, 0.013, width * (1.0, 0.65)[a], role=METAL)
    k0, k1 = s.cylinder(0.95 - s.u, width * (1.0, 0.65)[a], width, role=METAL)
    s.stripes.append((k1 - (0.05, 0.12)[c], k1, 0.0, 1.0, EDGE))
    return s


def _syringe(a: int, b: int, c: int) -> _Shape:
    """a: short / long needle; b: plunger pushed in / pulled out; c: narrow / wide barrel."""
    s = _Shape()
    barrel = (0.036, 0.05)[c]
    s.cylinder(0.015, 0.06, role=ACCENT)
    s.cylinder((0.08, 0.26)[b], 0.012, role=ACCENT)
    s.cylinder(0.015, barrel + 0.035, role=ACCENT)
    g0, g1 = s.cylinder(0.42, barrel, role=BODY)
    for centre in np.linspace(g0 + 0.08, g1 - 0.03, 7):
        s.stripes.append((centre - 0.006, centre + 0.006, 0.6, 1.0, DARK))
    s.cylinder(0.04, barrel * 0.5, 0.012, role=ACCENT)
    s.cylinder((0.12, 0.25)[a], 0.006, role=METAL)
    return s


FAMILIES = {
    "baton": _baton,
    "flashlight": _flashlight,
    "knife": _knife,
    "screwdriver": _screwdriver,
    "pen": _pen,
    "tube": _tube,
    "chisel": _chisel,
    "syringe": _syringe,
}
