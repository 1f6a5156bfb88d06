"""Drawing one synthetic frame: background, shaded body parts, motion blur, labels.

The body is drawn with PIL at `SS`x supersampling (then box-downscaled: antialiasing),
parts sorted far to near by depth (painter's algorithm), far-side limbs a little
darker. Motion blur imitates a camera shutter: the pose is drawn at several instants
over the shutter interval `[t - shutter, t]` (more instants the faster the limbs move)
and the drawings are averaged with weights rising towards `t`, so a fast limb leaves a
fading trail behind it: blur length shows its speed, the trail shows where it came from.
Labels are the pose at `t`, the sharpest instant.

Visibility comes from a part-id map drawn with the same shapes at the frame's
resolution: a joint is visible when it lies inside the frame and the part covering its
pixel is one of the parts that meet at that joint (and, for shoulders and hips seen
over the torso, when the joint is not on the torso's far side). Invisible joints keep
their true coordinates, also outside the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from training.synth.motion import HULL, NECK, PELVIS
from training.synth.scene import RGB, ClipSpec, Scene

SS = 2  # supersampling factor
MAX_SUBFRAMES = 16
TORSO, HEAD, L_UPPER, R_UPPER, L_FORE, R_FORE, L_THIGH, R_THIGH, L_SHIN, R_SHIN = range(1, 11)
# parts meeting at each of the 13 joints (Penn Action order)
OWNERS: tuple[frozenset[int], ...] = (
    frozenset({HEAD}),
    *(frozenset({TORSO, up}) for up in (L_UPPER, R_UPPER)),
    *(frozenset({up, fore}) for up, fore in ((L_UPPER, L_FORE), (R_UPPER, R_FORE))),
    frozenset({L_FORE}),
    frozenset({R_FORE}),
    *(frozenset({TORSO, th}) for th in (L_THIGH, R_THIGH)),
    *(frozenset({th, sh}) for th, sh in ((L_THIGH, L_SHIN), (R_THIGH, R_SHIN))),
    frozenset({L_SHIN}),
    frozenset({R_SHIN}),
)


def background(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8 backdrop: wall (flat, gradient, stripes, tiles or noise) + floor."""
    rng = np.random.default_rng(scene.texture_seed)
    h, w = scene.height, scene.width
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.array(scene.wall, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    period = int(rng.integers(10, 48))
    if scene.kind == "gradient":
        ramp = np.linspace(1.15, 0.85, h if rng.random() < 0.7 else w, dtype=np.float32)
        img *= (ramp[:, None] if len(ramp) == h else ramp[None, :])[..., None]
    elif scene.kind == "stripes":
        img *= (1 - 0.09 * (((xx if rng.random() < 0.6 else yy) // period) % 2))[..., None]
    elif scene.kind == "tiles":
        img *= (1 - 0.07 * (((xx // period) + (yy // period)) % 2))[..., None]
    elif scene.kind == "noise":
        low = rng.normal(0, 1, (h // 16 + 2, w // 16 + 2)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(low, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        img += 16 * smooth[..., None]
    if scene.floor is not None:
        top = int(max(0, min(h, round(scene.floor_line))))
        floor = (
            np.array(scene.floor, np.float32)
            * np.linspace(0.9, 1.1, h - top, dtype=np.float32)[:, None]
        )
        img[top:] = floor[:, None, :]
        if scene.floor_name == "wooden":
            img[top:] *= (1 - 0.15 * ((yy[top:] - top) % period < 2))[..., None]
        img[top : top + 2] *= 0.6  # skirting line where the wall meets the floor
    img += rng.normal(0, 2.0, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _mix(c: RGB, f: float, towards: float = 0.0) -> RGB:
    """Scale colour c by f, then blend a share `towards` with white."""
    return tuple(int(min(255, v * f * (1 - towards) + 255 * towards)) for v in c)  # type: ignore[return-value]


def _hull(pts: np.ndarray) -> list[tuple[float, float]]:
    """Convex hull (monotone chain) of 2D points."""
    p = sorted(map(tuple, pts.tolist()))

    def half(seq: list) -> list:
        out: list = []
        for q in seq:
            while (
                len(out) >= 2
                and (out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])
                <= 0
            ):
                out.pop()
            out.append(q)
        return out

    lower, upper = half(p), half(p[::-1])
    return lower[:-1] + upper[:-1]


class Painter:
    """Draws primitives in frame pixels onto an image at (x - ox) * k, (y - oy) * k.

    id_mode: draw every shape's full extent in the part id (for the visibility map)."""

    def __init__(self, img: Image.Image, k: float, ox: float, oy: float, light: float,
                 id_mode: bool = False, outline: float = 1.0):  # fmt: skip
        self.d, self.k, self.ox, self.oy, self.id = ImageDraw.Draw(img), k, ox, oy, id_mode
        self.light = (light / math.hypot(light, 0.7), -0.7 / math.hypot(light, 0.7))
        self.ol = outline
        self.pid = 0

    def _xy(self, p: np.ndarray) -> tuple[float, float]:
        return ((p[0] - self.ox) * self.k, (p[1] - self.oy) * self.k)

    def _disc(self, c: tuple[float, float], r: float, fill) -> None:
        self.d.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill)

    def capsule(self, p0: np.ndarray, p1: np.ndarray, width: float, col: RGB) -> None:
        a, b, w, ol = self._xy(p0), self._xy(p1), width * self.k, self.ol * self.k
        layers = [(w + 2 * ol, self.pid if self.id else _mix(col, 0.55))]
        if not self.id:
            layers.append((w, col))
        for lw, fill in layers:
            self.d.line([a, b], fill=fill, width=max(1, round(lw)))
            self._disc(a, lw / 2, fill)
            self._disc(b, lw / 2, fill)
        if not self.id and w >= 4:  # highlight along the lit side
            vx, vy = b[0] - a[0], b[1] - a[1]
            norm = math.hypot(vx, vy) + 1e-9
            nx, ny = -vy / norm, vx / norm
            sign = 0.22 * w * (1 if nx * self.light[0] + ny * self.light[1] >= 0 else -1)
            ha, hb, hw = (
                (a[0] + sign * nx, a[1] + sign * ny),
                (b[0] + sign * nx, b[1] + sign * ny),
                0.3 * w,
            )
            hi = _mix(col, 1.1, 0.22)
            self.d.line([ha, hb], fill=hi, width=max(1, round(hw)))
            self._disc(ha, hw / 2, hi)
            self._disc(hb, hw / 2, hi)

    def polygon(self, pts: list[tuple[float, float]], col: RGB) -> None:
        xy = [self._xy(p) for p in pts]
        width = max(1, round(self.ol * self.k))
        if self.id:
            self.d.polygon(xy, fill=self.pid, outline=self.pid, width=width)
        else:
            self.d.polygon(xy, fill=col, outline=_mix(col, 0.55), width=width)

    def disc(
        self, c: np.ndarray, r: float, col: RGB, outline: bool = True, detail: bool = False
    ) -> None:
        if self.id and detail:
            return
        ol = self.ol * self.k if outline else 0.0
        if ol:
            self._disc(self._xy(c), r * self.k + ol, self.pid if self.id else _mix(col, 0.55))
        if not self.id:
            self._disc(self._xy(c), r * self.k, col)


def to_pixels(spec: ClipSpec, pts: np.ndarray) -> np.ndarray:
    """World points (body units) -> (x px, y px, depth in body units)."""
    s = spec.scene
    return np.stack([s.cx + s.scale * pts[:, 0], s.floor_y - s.scale * pts[:, 1], pts[:, 2]], 1)


def paint_body(pt: Painter, spec: ClipSpec, p: np.ndarray) -> None:
    """Draw the body (points from `to_pixels`) far to near."""
    look, body, s = spec.look, spec.body, spec.scene.scale
    torso_z = float(p[HULL, 2].mean())
    yaw = spec.motion.yaw
    parts: list[tuple[float, int, Callable[[], None]]] = []

    def shade(col: RGB, z: float) -> RGB:
        return _mix(col, min(1.0, max(0.75, 1 + 2.0 * (z - torso_z))))

    def torso() -> None:
        pt.polygon(_hull(p[HULL, :2]), look.shirt)
        band = np.concatenate([p[21:25, :2], p[21:25, :2] + 0.25 * (p[17:21, :2] - p[21:25, :2])])
        pt.polygon(_hull(band), look.trousers)

    def head() -> None:
        c, r = p[0, :2], body.head_r * s
        fx, front = math.sin(yaw) * r, math.cos(yaw)
        hair_back = np.array([-0.35 * fx, 0.9 * r])
        if look.long_hair and front >= 0:
            pt.disc(c + hair_back, 1.05 * r, look.hair, outline=False)
        pt.capsule(
            p[NECK, :2],
            p[NECK, :2] + 0.5 * (c - p[NECK, :2]),
            0.42 * body.head_r * 2 * s,
            look.skin,
        )
        pt.disc(c, r, look.skin if front > -0.45 else look.hair)
        if front > -0.45:
            pt.disc(
                c + np.array([-0.2 * fx, -0.3 * r]), 0.85 * r, look.hair, outline=False, detail=True
            )
            if front > -0.1:
                for e in (-1, 1):
                    ex = 0.6 * fx + e * 0.33 * r * front
                    if abs(ex) < 0.85 * r:
                        pt.disc(
                            c + np.array([ex, 0.08 * r]),
                            0.1 * r,
                            (30, 25, 25),
                            outline=False,
                            detail=True,
                        )
        if look.long_hair and front < 0:
            pt.disc(c + hair_back, 1.05 * r, look.hair, outline=False)

    def limb(
        a: int, b: int, w: float, col: RGB, sleeve: RGB | None = None, end: Callable | None = None
    ):
        def draw() -> None:
            z = 0.5 * (p[a, 2] + p[b, 2])
            pt.capsule(p[a, :2], p[b, :2], w * s, shade(col, z))
            if sleeve is not None:
                pt.capsule(
                    p[a, :2],
                    p[a, :2] + 0.45 * (p[b, :2] - p[a, :2]),
                    1.15 * w * s,
                    shade(sleeve, z),
                )
            if end is not None:
                end(shade, z)

        return draw

    def hand(wr: int, el: int, ball: bool):
        def draw(sh, z) -> None:
            v = p[wr, :2] - p[el, :2]
            c = p[wr, :2] + 0.6 * body.arm_w * s * v / (np.linalg.norm(v) + 1e-9)
            pt.disc(c, 0.028 * s, sh(look.skin, z))
            if ball:
                pt.disc(c + np.array([0, 0.03 * s]), 0.055 * s, sh(look.ball, z))

        return draw

    def foot(an: int, toe: int):
        def draw(sh, z) -> None:
            pt.capsule(p[an, :2], p[toe, :2], 0.5 * body.leg_w * s, sh(look.shoes, z))

        return draw

    sleeve = look.shirt if look.long_sleeves else look.skin
    shin_col = look.skin if look.shorts else look.trousers
    bowl = spec.motion.action == "bowling"
    parts.append((torso_z, TORSO, torso))
    parts.append((float(p[0, 2]) + 0.001, HEAD, head))
    for sh, el, wr, up, fore, side in (
        (1, 3, 5, L_UPPER, L_FORE, 1),
        (2, 4, 6, R_UPPER, R_FORE, -1),
    ):
        short = None if look.long_sleeves else look.shirt
        parts.append(
            (0.5 * (p[sh, 2] + p[el, 2]) + 0.02, up, limb(sh, el, body.arm_w, sleeve, short))
        )
        ball = bowl and spec.motion.side == side
        parts.append((0.5 * (p[el, 2] + p[wr, 2]) + 0.021, fore,
                      limb(el, wr, 0.9 * body.arm_w, sleeve, end=hand(wr, el, ball))))  # fmt: skip
    for hip, kn, an, toe, th, shn in (
        (7, 9, 11, 15, L_THIGH, L_SHIN),
        (8, 10, 12, 16, R_THIGH, R_SHIN),
    ):
        parts.append(
            (0.5 * (p[hip, 2] + p[kn, 2]) - 0.02, th, limb(hip, kn, body.leg_w, look.trousers))
        )
        parts.append((0.5 * (p[kn, 2] + p[an, 2]) - 0.019, shn,
                      limb(kn, an, 0.85 * body.leg_w, shin_col, end=foot(an, toe))))  # fmt: skip
    for _, pid, draw in sorted(parts, key=lambda q: q[0]):
        pt.pid = pid
        draw()


def _shadow(crop: np.ndarray, spec: ClipSpec, p: np.ndarray, ox: int, oy: int) -> None:
    """Darken an ellipse on the floor under the body (fainter while airborne), in place
    on a supersampled uint8 crop whose top-left is frame pixel (ox, oy)."""
    s = spec.scene.scale
    height = (spec.scene.floor_y - max(p[11, 1], p[12, 1])) / s - spec.body.foot_h
    alpha = 0.35 * max(0.0, 1.0 - 3.0 * height)
    cx, cy = (p[PELVIS, 0] - ox) * SS, (spec.scene.floor_y - oy) * SS
    ax, ay = 0.25 * s * SS, 0.035 * s * SS
    xa, xb = max(0, int(cx - ax)), min(crop.shape[1], int(cx + ax) + 1)
    ya, yb = max(0, int(cy - ay)), min(crop.shape[0], int(cy + ay) + 1)
    if alpha <= 0 or xa >= xb or ya >= yb:
        return
    yy, xx = np.ogrid[ya:yb, xa:xb]
    inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    region = crop[ya:yb, xa:xb].astype(np.float32)
    region *= 1 - alpha * np.clip(1.5 - inside, 0, 1)[..., None]
    crop[ya:yb, xa:xb] = np.round(region).astype(np.uint8)


def render_frame(
    spec: ClipSpec, bg: np.ndarray, t: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Frame t: (image (H, W, 3) uint8, joints (13, 2) px, visible (13,) bool, bbox (4,) px)."""
    h, w = bg.shape[:2]
    now = to_pixels(spec, spec.points(t))
    start = to_pixels(spec, spec.points(t - spec.shutter))
    disp = float(np.max(np.linalg.norm(now[:13, :2] - start[:13, :2], axis=1)))
    k = int(np.clip(1 + math.ceil(disp / 2.5), 1, MAX_SUBFRAMES))
    times = [t - spec.shutter * (1 - i / (k - 1)) for i in range(k)] if k > 1 else [t]
    poses = [to_pixels(spec, spec.points(ti)) for ti in times[:-1]] + [now]
    weights = np.array([0.3 + 0.7 * i / max(k - 1, 1) for i in range(k)], np.float32)
    weights /= weights.sum()
    outline = max(0.5, 0.006 * spec.scene.scale)
    # Crop around everything the body covers during the shutter; draw there only.
    allp = np.concatenate([q[:, :2] for q in poses])
    margin = 0.15 * spec.scene.scale + 3
    (x0, y0), (x1, y1) = np.floor(allp.min(0) - margin), np.ceil(allp.max(0) + margin)
    x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(w, int(x1)), min(h, int(y1))
    frame = bg.copy()
    if x1 > x0 and y1 > y0:
        crop = np.repeat(np.repeat(bg[y0:y1, x0:x1], SS, 0), SS, 1)
        _shadow(crop, spec, now, x0, y0)
        base = Image.fromarray(crop)
        acc, total = None, 0.0
        for q, wt in zip(poses, weights, strict=True):  # running weighted mean of sub-frames
            im = base.copy()
            paint_body(Painter(im, SS, x0, y0, spec.scene.light, outline=outline), spec, q)
            total += float(wt)
            acc = im if acc is None else Image.blend(acc, im, float(wt) / total)
        frame[y0:y1, x0:x1] = np.asarray(acc.reduce(SS))
    # Part-id map at the frame's resolution -> visibility and box.
    ids = Image.new("L", (w, h), 0)
    paint_body(Painter(ids, 1, 0, 0, spec.scene.light, id_mode=True, outline=outline), spec, now)
    idm = np.asarray(ids)
    joints = now[:13, :2].copy()
    visible = np.zeros(13, bool)
    torso_z = float(now[HULL, 2].mean())
    for j in range(13):
        x, y = joints[j]
        if not (0 <= x < w and 0 <= y < h):
            continue
        pid = int(idm[int(y), int(x)])
        half = spec.body.shoulder_half if j in (1, 2) else spec.body.hip_half
        behind = pid == TORSO and now[j, 2] < torso_z - 0.75 * half
        visible[j] = pid in OWNERS[j] and not behind
    cols, rows = np.flatnonzero(idm.any(0)), np.flatnonzero(idm.any(1))
    if len(cols):
        bbox = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)
    else:  # the body is entirely outside the frame
        lo, hi = np.clip(joints.min(0), 0, [w, h]), np.clip(joints.max(0), 0, [w, h])
        bbox = np.array([*lo, *hi], np.float64)
    return frame, joints, visible, bbox
