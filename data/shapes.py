"""The 16 object classes of the synthetic benchmark, each a random composition of primitives.

Classes come in groups whose members differ in one part or one proportion, so a classifier
has to look at local geometry rather than at the overall extent of the cloud:

* furniture: table (4 legs, rectangular top) / desk (a drawer pedestal instead of two legs) /
  stool (round top, 3-4 splayed legs) / chair (a backrest);
* vessels: cup / mug (a handle) / bowl (shallow, curved) / bottle (long narrow neck) /
  vase (waist and flared lip) / lamp (pole and open shade);
* extruded profiles: l_bracket / t_bracket / u_channel / i_beam, lying on any side or standing;
* cases: bookshelf (open front, inner shelves) / cabinet (closed doors, handles).

Every builder draws its proportions from continuous ranges that overlap within a group and
adds optional parts (stretchers, saucers, foot rings, plinths) that mimic the telltale part of
a sibling class in global statistics. Builders return points in a y-up frame; pose, scale and
sensor-like nuisances are added afterwards by `data/synthetic.py`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from data._primitives import Part, arc_tube, box, revolve, rotation, sample_parts, tube

__all__ = ["CLASSES", "class_names"]

Builder = Callable[[np.random.Generator, int], np.ndarray]


def _leg(x: float, z: float, top: float, size: float, round_: bool) -> Part:
    if round_:
        return tube((x, 0.0, z), (x, top, z), size / 2)
    return box((x, top / 2, z), (size, top, size))


def _four_legs(rng: np.random.Generator, w: float, d: float, top: float, inset: float, size: float) -> list[Part]:
    round_ = rng.random() < 0.5
    xs, zs = w / 2 - inset - size / 2, d / 2 - inset - size / 2
    return [_leg(sx * xs, sz * zs, top, size, round_) for sx in (-1, 1) for sz in (-1, 1)]


def _stretchers(w: float, d: float, y: float, inset: float, size: float) -> list[Part]:
    xs, zs = w / 2 - inset - size / 2, d / 2 - inset - size / 2
    return [box((0, y, s * zs), (2 * xs, size * 0.6, size * 0.6)) for s in (-1, 1)] + \
           [box((s * xs, y, 0), (size * 0.6, size * 0.6, 2 * zs)) for s in (-1, 1)]


def _pedestal(rng: np.random.Generator, top: float, foot: float) -> list[Part]:
    """A single central column on a base: the support of pedestal tables (and, shaped alike, of lamps)."""
    base = revolve(np.array([[0, 0.04], [foot, 0.02], [foot, 0.0]])) if rng.random() < 0.5 else None
    column = tube((0, 0, 0), (0, top, 0), rng.uniform(0.03, 0.07))
    if base is not None:
        return [column, base]
    return [column] + [box((0, 0.02, 0), (2 * foot, 0.04, 0.06)), box((0, 0.02, 0), (0.06, 0.04, 2 * foot))]


def table(rng: np.random.Generator, n: int) -> np.ndarray:
    w, d, h, t = rng.uniform(0.8, 1.6), rng.uniform(0.5, 1.0), rng.uniform(0.55, 0.9), rng.uniform(0.03, 0.07)
    inset, leg = rng.uniform(0.0, 0.12), rng.uniform(0.04, 0.09)
    round_top = rng.random() < 0.3
    if round_top:
        w = d = min(w, 1.2)
        parts = [revolve(np.array([[0, h], [w / 2, h], [w / 2, h - t], [0, h - t]]))]
    else:
        parts = [box((0, h - t / 2, 0), (w, t, d))]
    if rng.random() < 0.25:  # pedestal table
        return sample_parts(parts + _pedestal(rng, h - t, rng.uniform(0.25, 0.4) * w), n, rng)
    span = 0.7 if round_top else 1.0  # legs of a round table stand inside the circle
    parts += _four_legs(rng, w * span, d * span, h - t, inset, leg)
    if rng.random() < 0.4:
        parts += _stretchers(w * span, d * span, rng.uniform(0.1, 0.3) * h, inset, leg)
    return sample_parts(parts, n, rng)


def desk(rng: np.random.Generator, n: int) -> np.ndarray:
    w, d, h, t = rng.uniform(0.8, 1.6), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.85), rng.uniform(0.03, 0.07)
    pw, leg, side = rng.uniform(0.25, 0.4) * w, rng.uniform(0.04, 0.08), rng.choice([-1.0, 1.0])
    parts = [box((0, h - t / 2, 0), (w, t, d)),
             box((side * (w / 2 - pw / 2), (h - t) / 2, 0), (pw, h - t, d * 0.95))]  # drawer pedestal
    x = -side * (w / 2 - leg)
    parts += [_leg(x, s * (d / 2 - leg), h - t, leg, False) for s in (-1, 1)]
    if rng.random() < 0.5:  # modesty panel at the back
        parts.append(box((-side * pw / 2, h * 0.6, -d / 2 + 0.02), (w - pw - leg, h * 0.5, 0.02)))
    return sample_parts(parts, n, rng)


def stool(rng: np.random.Generator, n: int) -> np.ndarray:
    r, h, t = rng.uniform(0.16, 0.3), rng.uniform(0.4, 0.8), rng.uniform(0.03, 0.06)
    legs, leg = int(rng.integers(3, 5)), rng.uniform(0.025, 0.05)
    splay, phase = rng.uniform(1.1, 1.4), rng.uniform(0, 2 * np.pi)
    if rng.random() < 0.7:
        top = revolve(np.array([[0, h], [r, h], [r, h - t], [0, h - t]]))
    else:  # square seat
        top = box((0, h - t / 2, 0), (1.6 * r, t, 1.6 * r))
    angles = phase + 2 * np.pi * np.arange(legs) / legs
    feet = [(splay * r * np.cos(a), 0.0, splay * r * np.sin(a)) for a in angles]
    heads = [(0.65 * r * np.cos(a), h - t, 0.65 * r * np.sin(a)) for a in angles]
    parts = [top] + [tube(f, hd, leg / 2) for f, hd in zip(feet, heads)]  # splayed legs
    if rng.random() < 0.5:  # foot ring joining the legs
        y = rng.uniform(0.25, 0.4)
        ring = [np.array(f) * (1 - y) + np.array(hd) * y for f, hd in zip(feet, heads)]
        parts += [tube(ring[i], ring[(i + 1) % legs], leg / 3) for i in range(legs)]
    return sample_parts(parts, n, rng)


def chair(rng: np.random.Generator, n: int) -> np.ndarray:
    w, d, hs, t = rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.5), rng.uniform(0.04, 0.07)
    hb, leg = rng.uniform(0.25, 0.5), rng.uniform(0.035, 0.06)
    parts = [box((0, hs - t / 2, 0), (w, t, d))] + _four_legs(rng, w, d, hs - t, 0.0, leg)
    z = -d / 2 + 0.02
    if rng.random() < 0.6:  # solid backrest
        parts.append(box((0, hs + hb / 2, z), (w, hb, 0.03)))
    else:  # slats under a top rail
        slats = int(rng.integers(3, 6))
        parts.append(box((0, hs + hb - 0.04, z), (w, 0.08, 0.03)))
        parts += [box((x, hs + hb / 2, z), (0.03, hb, 0.03)) for x in np.linspace(-w / 2 + 0.02, w / 2 - 0.02, slats)]
    return sample_parts(parts, n, rng)


def _cup_body(rng: np.random.Generator) -> tuple[list[Part], float, float]:
    r, h = rng.uniform(0.3, 0.45), rng.uniform(0.6, 1.1)
    top = r * rng.uniform(1.0, 1.25)
    parts = [revolve(np.array([[0, 0], [r, 0], [top, h]]))]  # open top
    return parts, r, h


def cup(rng: np.random.Generator, n: int) -> np.ndarray:
    parts, r, h = _cup_body(rng)
    if rng.random() < 0.4:  # saucer: extra points beyond the wall, as a handle would add
        rs = r * rng.uniform(1.3, 1.7)
        parts.append(revolve(np.array([[0, -0.03], [rs, -0.03], [rs * 1.05, 0.02]])))
    return sample_parts(parts, n, rng)


def mug(rng: np.random.Generator, n: int) -> np.ndarray:
    parts, r, h = _cup_body(rng)
    hr, tr = rng.uniform(0.18, 0.3) * h, rng.uniform(0.025, 0.05)
    yc = rng.uniform(0.4, 0.6) * h
    parts += arc_tube((r * 0.95, yc, 0), hr, tr, -np.pi / 2, np.pi / 2)  # handle on the +x side
    return sample_parts(parts, n, rng)


def bowl(rng: np.random.Generator, n: int) -> np.ndarray:
    r, depth, phi_max = rng.uniform(0.45, 0.65), rng.uniform(0.3, 0.6), rng.uniform(1.2, np.pi / 2)
    phi = np.linspace(0, phi_max, 16)
    profile = np.stack([r * np.sin(phi), depth * (1 - np.cos(phi))], 1)
    parts = [revolve(profile)]
    if rng.random() < 0.5:  # foot ring
        rf = r * rng.uniform(0.3, 0.5)
        parts.append(revolve(np.array([[rf, -0.06], [rf, depth * (1 - np.cos(np.arcsin(rf / r)))]])))
    return sample_parts(parts, n, rng)


def _vessel_body(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Closed-bottom body of a bottle or vase up to the shoulder: (profile rows (r, y), belly radius)."""
    belly, hb = rng.uniform(0.25, 0.4), rng.uniform(0.6, 1.0)
    control_y = np.array([0, rng.uniform(0.3, 0.6), 1.0]) * hb
    control_r = np.array([rng.uniform(0.6, 1.0), 1.0, rng.uniform(0.6, 1.0)]) * belly
    ys = np.linspace(0, hb, 12)
    rs = np.interp(ys, control_y, control_r)
    rs = np.convolve(np.pad(rs, 2, mode="edge"), np.ones(5) / 5, mode="valid")  # smooth the kinks
    return np.concatenate([[[0, 0]], np.stack([rs, ys], 1)]), belly


def bottle(rng: np.random.Generator, n: int) -> np.ndarray:
    body, belly = _vessel_body(rng)
    top, hs, ln = body[-1, 1], rng.uniform(0.1, 0.25), rng.uniform(0.15, 0.4)
    rn = belly * rng.uniform(0.2, 0.35)
    neck = [[rn, top + hs], [rn, top + hs + ln]]  # shoulder cone then a long narrow neck
    if rng.random() < 0.5:  # lip ring
        neck += [[rn * 1.3, top + hs + ln], [rn * 1.3, top + hs + ln - 0.04]]
    return sample_parts([revolve(np.concatenate([body, neck]))], n, rng)


def vase(rng: np.random.Generator, n: int) -> np.ndarray:
    body, belly = _vessel_body(rng)
    top, hw, hl = body[-1, 1], rng.uniform(0.1, 0.25), rng.uniform(0.1, 0.25)
    waist, lip = belly * rng.uniform(0.45, 0.65), belly * rng.uniform(0.7, 1.05)
    neck = [[waist, top + hw], [(waist + lip) / 2, top + hw + hl * 0.6], [lip, top + hw + hl]]  # flared
    return sample_parts([revolve(np.concatenate([body, neck]))], n, rng)


def lamp(rng: np.random.Generator, n: int) -> np.ndarray:
    rb, tb, hp = rng.uniform(0.15, 0.3), rng.uniform(0.02, 0.06), rng.uniform(0.5, 1.1)
    rs, hs = rng.uniform(0.2, 0.35), rng.uniform(0.2, 0.35)
    rt = rs * (rng.uniform(0.4, 0.8) if rng.random() < 0.7 else 1.0)  # conical or drum shade
    y0 = hp - rng.uniform(0.3, 0.7) * hs
    parts = [revolve(np.array([[0, tb], [rb, tb], [rb, 0]])),
             tube((0, tb, 0), (0, hp, 0), rng.uniform(0.012, 0.03)),
             revolve(np.array([[rs, y0], [rt, y0 + hs]]))]  # open shade
    return sample_parts(parts, n, rng)


def _profile(rng: np.random.Generator, n: int, rects: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Extrude 2-D rectangles (u0, v0, u1, v1) along w, then lay the piece on a random side."""
    length = rng.uniform(0.4, 1.4)
    parts = [box(((u0 + u1) / 2, (v0 + v1) / 2, 0), (u1 - u0, v1 - v0, length)) for u0, v0, u1, v1 in rects]
    pts = sample_parts(parts, n, rng)
    pts = pts @ rotation(2, rng.integers(4) * np.pi / 2).T  # on any of its four sides
    if rng.random() < 1 / 3:  # or standing on its end
        pts = pts @ rotation(0, np.pi / 2).T
    return pts


def _flanges(rng: np.random.Generator) -> tuple[float, float, float]:
    return rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.6), rng.uniform(0.03, 0.08)


def l_bracket(rng: np.random.Generator, n: int) -> np.ndarray:
    a, b, t = _flanges(rng)
    return _profile(rng, n, [(0, 0, t, a), (t, 0, b, t)])


def t_bracket(rng: np.random.Generator, n: int) -> np.ndarray:
    a, b, t = _flanges(rng)
    return _profile(rng, n, [(-b / 2, a - t, b / 2, a), (-t / 2, 0, t / 2, a - t)])


def u_channel(rng: np.random.Generator, n: int) -> np.ndarray:
    a, b, t = _flanges(rng)
    return _profile(rng, n, [(-b / 2, 0, b / 2, t), (-b / 2, t, -b / 2 + t, a), (b / 2 - t, t, b / 2, a)])


def i_beam(rng: np.random.Generator, n: int) -> np.ndarray:
    a, b, t = _flanges(rng)
    return _profile(rng, n, [(-b / 2, 0, b / 2, t), (-b / 2, a - t, b / 2, a), (-t / 2, t, t / 2, a - t)])


def _case(rng: np.random.Generator) -> tuple[list[Part], float, float, float, float]:
    w, h, d, t = rng.uniform(0.6, 1.2), rng.uniform(0.7, 1.8), rng.uniform(0.25, 0.45), rng.uniform(0.02, 0.04)
    parts = [box((s * (w - t) / 2, h / 2, 0), (t, h, d)) for s in (-1, 1)]  # sides
    parts += [box((0, y, 0), (w - 2 * t, t, d)) for y in (t / 2, h - t / 2)]  # bottom, top
    parts.append(box((0, h / 2, -d / 2 + t / 4), (w - 2 * t, h - 2 * t, t / 2)))  # back
    return parts, w, h, d, t


def bookshelf(rng: np.random.Generator, n: int) -> np.ndarray:
    parts, w, h, d, t = _case(rng)
    shelves = int(rng.integers(1, 5))
    ys = np.linspace(0, h, shelves + 2)[1:-1] + rng.uniform(-0.03, 0.03, shelves)
    parts += [box((0, y, 0), (w - 2 * t, t, d - t)) for y in ys]
    return sample_parts(parts, n, rng)


def cabinet(rng: np.random.Generator, n: int) -> np.ndarray:
    parts, w, h, d, t = _case(rng)
    doors = int(rng.integers(1, 3))
    dw = (w - 2 * t) / doors
    for i in range(doors):  # doors with a small gap between them
        x = -w / 2 + t + dw * (i + 0.5)
        parts.append(box((x, h / 2, d / 2 - t / 2), (dw - 0.01, h - 2 * t, t)))
        if rng.random() < 0.8:  # handle
            hx = x + (dw / 2 - 0.06) * (1 if i == 0 else -1)
            parts.append(box((hx, h * rng.uniform(0.4, 0.7), d / 2 + 0.02), (0.02, 0.12, 0.03)))
    return sample_parts(parts, n, rng)


CLASSES: dict[str, Builder] = {
    f.__name__: f
    for f in (table, desk, stool, chair, cup, mug, bowl, bottle, vase, lamp,
              l_bracket, t_bracket, u_channel, i_beam, bookshelf, cabinet)
}


def class_names() -> list[str]:
    """Class list in label order (written to the cache's `shape_names.txt`)."""
    return list(CLASSES)
