"""Kinematics of the synthetic person: a 3D stick skeleton posed by joint angles.

Each action maps a phase `u` in [0, 1) of its cycle to joint angles; forward kinematics
turns the angles into 3D points in body units (standing height ~1), with the feet kept
on the floor, and a yaw turns the body to face the camera, the side or away. The
renderer (`training.synth.render`) projects these points orthographically.

Body frame: +x is the person's left, +y up, +z the way the person faces. After the yaw
the world frame is the camera's: +x image right, +y up, +z towards the camera (depth).

Motion within a clip is deterministic in time: a fixed tempo (frames per cycle), phase
offset and amplitude, with asymmetric phase warps (a punch goes out fast and comes back
slower, a squat goes down slower than it comes up), so a single frame's pose, blur and
facing tell where the motion goes next.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ACTIONS: tuple[str, ...] = (
    "jumping_jacks",
    "squats",
    "wave_one_arm",
    "wave_both_arms",
    "arm_circles",
    "walking",
    "punching",
    "lunges",
    "jumping",
    "bowling",
)

# Point indices: the 13 Penn Action joints first (same order), then helper points.
NECK, PELVIS, L_TOE, R_TOE = 13, 14, 15, 16
HULL = slice(17, 25)  # torso box corners (shoulders and hips, front and back)
NUM_POINTS = 25


@dataclass(frozen=True)
class Body:
    """Segment lengths and widths in body units (standing height ~1)."""

    torso: float = 0.30
    head_off: float = 0.10  # neck -> head centre
    head_r: float = 0.065
    shoulder_half: float = 0.11
    hip_half: float = 0.065
    upper_arm: float = 0.17
    forearm: float = 0.15
    thigh: float = 0.245
    shin: float = 0.245
    foot_h: float = 0.035  # ankle above the sole
    foot_len: float = 0.09
    chest_depth: float = 0.11
    arm_w: float = 0.05
    leg_w: float = 0.075

    @property
    def leg(self) -> float:
        return self.thigh + self.shin


def sample_body(rng: np.random.Generator) -> Body:
    """A body with varied proportions (limb lengths +-7 %, build 0.8-1.25)."""
    j = lambda: float(rng.uniform(0.93, 1.07))  # noqa: E731
    build = float(rng.uniform(0.8, 1.25))
    return Body(
        torso=0.30 * j(),
        head_r=0.065 * float(rng.uniform(0.9, 1.1)),
        shoulder_half=0.11 * float(rng.uniform(0.9, 1.12)),
        hip_half=0.065 * float(rng.uniform(0.9, 1.15)),
        upper_arm=0.17 * j(),
        forearm=0.15 * j(),
        thigh=0.245 * j(),
        shin=0.245 * j(),
        chest_depth=0.11 * build,
        arm_w=0.048 * build,
        leg_w=0.072 * build,
    )


@dataclass(frozen=True)
class Motion:
    """Per-clip motion parameters: everything that makes the clip's motion predictable."""

    action: str
    period: float  # frames per cycle
    phase0: float  # phase at frame 0, in cycles
    asym: float  # share of the cycle spent on its first half (0.5 = symmetric)
    amp: float  # amplitude factor (~0.8-1.1)
    side: int  # +1: the left arm/leg leads, -1: the right one
    direction: int  # +1 / -1: arm-circle direction, or walking forward (+1) / in place (0)
    yaw: float  # facing, radians: 0 camera, +pi/2 image right, pi away

    def phase(self, t: float) -> float:
        """Warped phase u in [0, 1) at (possibly fractional) frame t."""
        return warp((t / self.period + self.phase0) % 1.0, self.asym)


def warp(p: float, r: float) -> float:
    """Asymmetric phase warp: the first half of the cycle takes a share `r` of the time."""
    return 0.5 * p / r if p < r else 0.5 + 0.5 * (p - r) / (1.0 - r)


def bump(u: float) -> float:
    """0 -> 1 -> 0 over one cycle with zero velocity at both ends and the top."""
    return 0.5 - 0.5 * math.cos(2.0 * math.pi * u)


def smoothstep(x: float) -> float:
    """0 -> 1 over x in [0, 1] with zero slope at both ends (clamped outside)."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def keyframes(u: float, keys: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Ease-in/out interpolation between (u, angles) keys; the first key is at u=0 and the
    cycle wraps to it after the last one."""
    keys = [*keys, (1.0, keys[0][1])]
    for (u0, a0), (u1, a1) in itertools.pairwise(keys):
        if u0 <= u <= u1:
            s = smoothstep((u - u0) / max(u1 - u0, 1e-9))
            return {k: a0.get(k, 0.0) * (1 - s) + a1.get(k, 0.0) * s for k in a0.keys() | a1.keys()}
    return dict(keys[0][1])


# --- actions: phase -> angles (degrees) ----------------------------------------------------
# Keys: {l,r}_abd / {l,r}_flex (shoulder abduction / flexion), {l,r}_elbow, {l,r}_hip_abd,
# {l,r}_hip_flex, {l,r}_knee, lean (forward), side_lean (to the left), twist, lift (body
# units, airborne). Elbows bend towards ELBOW_REF[action] ("fwd", "up", "in").

Angles = dict[str, float]


def _jumping_jacks(u: float, m: Motion) -> Angles:
    s = bump(u)
    arm, leg = min(12 + 158 * s * m.amp, 172), 3 + 16 * s * m.amp
    lift = 0.035 * m.amp * max(0.0, math.sin(4 * math.pi * u))
    return dict(l_abd=arm, r_abd=arm, l_elbow=10 + 15 * s, r_elbow=10 + 15 * s,
                l_hip_abd=leg, r_hip_abd=leg, l_knee=5, r_knee=5, lift=lift)  # fmt: skip


def _squats(u: float, m: Motion) -> Angles:
    s = bump(u) * m.amp
    return dict(l_hip_flex=95 * s, r_hip_flex=95 * s, l_knee=112 * s, r_knee=112 * s,
                l_hip_abd=9, r_hip_abd=9, lean=8 + 28 * s, l_flex=15 + 70 * s, r_flex=15 + 70 * s,
                l_abd=8, r_abd=8, l_elbow=10, r_elbow=10)  # fmt: skip


def _wave_one_arm(u: float, m: Motion) -> Angles:
    a, w = ("l", "r") if m.side > 0 else ("r", "l")
    abd = 115 + 15 * m.amp
    return {f"{a}_abd": abd, f"{a}_elbow": (180 - abd) + 38 * m.amp * math.sin(2 * math.pi * u),
            f"{w}_abd": 8, f"{w}_elbow": 12, "side_lean": -3 * m.side, "l_hip_abd": 4,
            "r_hip_abd": 4}  # fmt: skip


def _wave_both_arms(u: float, m: Motion) -> Angles:
    sway = math.sin(2 * math.pi * u) * m.amp
    return dict(l_abd=148 + 22 * sway, r_abd=148 - 22 * sway, l_elbow=18 - 10 * sway,
                r_elbow=18 + 10 * sway, side_lean=-6 * sway, l_hip_abd=5, r_hip_abd=5)  # fmt: skip


def _arm_circles(u: float, m: Motion) -> Angles:
    f = m.direction * 360.0 * u
    return dict(l_flex=f, r_flex=f, l_abd=14 + 10 * m.amp, r_abd=14 + 10 * m.amp, l_elbow=5,
                r_elbow=5, lean=4, l_hip_abd=6, r_hip_abd=6)  # fmt: skip


def _walking(u: float, m: Motion) -> Angles:
    amp = 22 * m.amp
    out: Angles = {"lean": 4 + 6 * m.amp * abs(m.direction)}
    for side, ph in (("l", 0.0), ("r", math.pi)):
        phi = 2 * math.pi * u + ph
        out[f"{side}_hip_flex"] = amp * math.sin(phi)
        out[f"{side}_knee"] = 5 + 55 * m.amp * max(0.0, math.cos(phi)) ** 1.5
        out[f"{side}_flex"] = -0.9 * amp * math.sin(phi)
        out[f"{side}_elbow"] = 20 + 12 * math.sin(phi)
        out[f"{side}_abd"] = 6
    return out


def _punching(u: float, m: Motion) -> Angles:
    a, g = ("l", "r") if m.side > 0 else ("r", "l")
    s = bump(u) * m.amp
    return {f"{a}_flex": 30 + 58 * s, f"{a}_elbow": 118 - 113 * s, f"{a}_abd": 22 - 17 * s,
            f"{g}_flex": 32, f"{g}_elbow": 118, f"{g}_abd": 22, "twist": -16 * m.side * s,
            "lean": 6 + 8 * s, f"{g}_hip_flex": 18, f"{g}_knee": 15, f"{a}_hip_flex": -10,
            f"{a}_knee": 8, "l_hip_abd": 6, "r_hip_abd": 6}  # fmt: skip


def _lunges(u: float, m: Motion) -> Angles:
    f, b = ("l", "r") if m.side > 0 else ("r", "l")
    s = bump(u) * m.amp
    return {f"{f}_hip_flex": 30 + 60 * s, f"{f}_knee": 90 * s, f"{b}_hip_flex": -30 + 30 * s,
            f"{b}_knee": 90 * s, "lean": 4 + 4 * s, "l_abd": 10, "r_abd": 10, "l_elbow": 15,
            "r_elbow": 15}  # fmt: skip


_STAND = dict(l_abd=8, r_abd=8, l_elbow=10, r_elbow=10, l_hip_abd=5, r_hip_abd=5)


def _crouch(c: float, arms: float) -> Angles:
    return dict(l_hip_flex=70 * c, r_hip_flex=70 * c, l_knee=100 * c, r_knee=100 * c,
                lean=25 * c, l_flex=arms, r_flex=arms, l_abd=8, r_abd=8, l_elbow=10,
                r_elbow=10, l_hip_abd=5, r_hip_abd=5)  # fmt: skip


def _jumping(u: float, m: Motion) -> Angles:
    # crouch slowly, launch fast, fly on a parabola, absorb the landing, stand up.
    a = keyframes(u, [(0.0, _crouch(0, 0)), (0.30, _crouch(0.9 * m.amp, -45)),
                      (0.40, _crouch(0, 165)), (0.70, _crouch(0.05, 120)),
                      (0.80, _crouch(0.55 * m.amp, 40))])  # fmt: skip
    x = (u - 0.40) / 0.30
    a["lift"] = 0.22 * m.amp * 4 * x * (1 - x) if 0 < x < 1 else 0.0
    return a


def _bowling(u: float, m: Motion) -> Angles:
    a, o = ("l", "r") if m.side > 0 else ("r", "l")  # bowling arm, other arm

    def key(flex: float, elbow: float, lean: float, step: float) -> Angles:
        return {f"{a}_flex": flex, f"{a}_elbow": elbow, f"{a}_abd": 10, f"{o}_abd": 30 + 25 * step,
                f"{o}_flex": 20 * step, f"{o}_elbow": 20, "lean": lean,
                f"{o}_hip_flex": 55 * step * m.amp, f"{o}_knee": 60 * step * m.amp,
                f"{a}_hip_flex": -25 * step, f"{a}_knee": 20 * step}  # fmt: skip

    return keyframes(u, [(0.0, key(25, 75, 8, 0)), (0.40, key(-65 * m.amp, 5, 22, 0.3)),
                         (0.58, key(35, 5, 34, 1)), (0.72, key(115 * m.amp, 25, 24, 0.9))])  # fmt: skip


POSES: dict[str, Callable[[float, Motion], Angles]] = {
    "jumping_jacks": _jumping_jacks, "squats": _squats, "wave_one_arm": _wave_one_arm,
    "wave_both_arms": _wave_both_arms, "arm_circles": _arm_circles, "walking": _walking,
    "punching": _punching, "lunges": _lunges, "jumping": _jumping, "bowling": _bowling,
}  # fmt: skip
ELBOW_REF = {"wave_one_arm": "up", "wave_both_arms": "up", "punching": "up"}
PLANTED = {"squats", "lunges", "punching", "jumping", "bowling", "jumping_jacks"}

# --- forward kinematics --------------------------------------------------------------------


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _limb_dir(abd: float, flex: float, sigma: int, frame: np.ndarray) -> np.ndarray:
    """Direction of a limb hanging down, abducted sideways and flexed forwards (radians)."""
    ca = math.cos(abd)
    return frame @ np.array([sigma * math.sin(abd), -ca * math.cos(flex), ca * math.sin(flex)])


def _bend(d: np.ndarray, ref: np.ndarray, angle: float, fallback: np.ndarray) -> np.ndarray:
    """Rotate unit vector d by `angle` towards ref (in the plane of d and ref)."""
    w = ref - (ref @ d) * d
    n = np.linalg.norm(w)
    if n < 1e-6:
        w = fallback - (fallback @ d) * d
        n = np.linalg.norm(w)
    return math.cos(angle) * d + math.sin(angle) * w / n


def _hinge(d: np.ndarray, abd: float, sigma: int, angle: float) -> np.ndarray:
    """Bend a thigh direction d backwards by `angle` about the knee's hinge axis (the
    abducted lateral axis made perpendicular to d), so the knee bends in the leg's plane."""
    h = np.array([math.cos(abd), sigma * math.sin(abd), 0.0])
    h -= (h @ d) * d
    h /= np.linalg.norm(h)
    return math.cos(angle) * d + math.sin(angle) * np.cross(h, d)


def skeleton(body: Body, angles: Angles, action: str = "", yaw: float = 0.0) -> np.ndarray:
    """(NUM_POINTS, 3) points in body units: feet on the floor (y = 0), yaw applied."""
    g = lambda k: math.radians(angles.get(k, 0.0))  # noqa: E731
    torso_rot = _rot_y(g("twist")) @ _rot_x(g("lean")) @ _rot_z(-g("side_lean"))
    lx, up, fw = torso_rot[:, 0], torso_rot[:, 1], torso_rot[:, 2]
    eye = np.eye(3)
    p = np.zeros((NUM_POINTS, 3))
    p[NECK] = body.torso * up
    p[0] = p[NECK] + body.head_off * up
    refs = {"fwd": fw, "up": up}
    for sigma, (sh, el, wr, hip, kn, an, toe), side in (
        (1, (1, 3, 5, 7, 9, 11, L_TOE), "l"),
        (-1, (2, 4, 6, 8, 10, 12, R_TOE), "r"),
    ):
        p[sh] = p[NECK] - 0.03 * up + sigma * body.shoulder_half * lx
        d = _limb_dir(g(f"{side}_abd"), g(f"{side}_flex"), sigma, torso_rot)
        p[el] = p[sh] + body.upper_arm * d
        ref = refs.get(ELBOW_REF.get(action, "fwd"), fw)
        p[wr] = p[el] + body.forearm * _bend(d, ref, g(f"{side}_elbow"), -sigma * lx)
        p[hip] = sigma * body.hip_half * eye[0]
        d = _limb_dir(g(f"{side}_hip_abd"), g(f"{side}_hip_flex"), sigma, eye)
        p[kn] = p[hip] + body.thigh * d
        p[an] = p[kn] + body.shin * _hinge(d, g(f"{side}_hip_abd"), sigma, g(f"{side}_knee"))
        p[toe] = p[an] + np.array([0.0, -0.6 * body.foot_h, body.foot_len])
    half = 0.5 * body.chest_depth
    corners = [p[1] + 0.4 * body.arm_w * lx, p[2] - 0.4 * body.arm_w * lx, p[7], p[8]]
    torso_pts = [
        c + s * half * (fw if i < 2 else eye[2]) for i, c in enumerate(corners) for s in (1, -1)
    ]
    p[HULL] = np.array(torso_pts)
    # Feet on the floor; planted actions keep the feet's midpoint under the same spot.
    shift = np.array([0.0, body.foot_h - min(p[11, 1], p[12, 1]) + angles.get("lift", 0.0), 0.0])
    if action in PLANTED:
        shift[2] = -0.5 * (p[11, 2] + p[12, 2])
    p += shift
    return p @ _rot_y(yaw).T


def stride_per_cycle(body: Body, m: Motion) -> float:
    """Distance walked per gait cycle (two steps) so the stance foot does not slide."""
    return 4.0 * body.leg * math.sin(math.radians(22 * m.amp))


def pose_at(body: Body, m: Motion, t: float) -> np.ndarray:
    """World points at frame t (fractional for motion blur); walking travels along +x*sin(yaw)."""
    pts = skeleton(body, POSES[m.action](m.phase(t), m), m.action, m.yaw)
    if m.action == "walking" and m.direction:
        pts[:, 0] += stride_per_cycle(body, m) * (t / m.period) * math.sin(m.yaw)
    return pts
