"""What one synthetic clip shows: drawn once per clip from its own random generator.

`sample_spec(seed, index, frames)` fixes everything about clip `index` (action and
tempo, body, clothes, background, camera framing, shutter, split, caption wording) from
`(seed, index)` alone, so a clip never depends on which worker renders it.

With `switch_share` > 0 that share of clips changes action every 25-45 frames, blending
into the next motion over BLEND frames. Such a clip's label (and caption) of frame i names
the action of frame i + LEAD, what the person is about to do: so a label can tell a
forecast something the pose cannot, which a one-action clip never does (docs/model.md,
steering). The switches come from a generator of their own, so the rest of a clip is the
same at any share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from training.synth.motion import (
    ACTIONS,
    Body,
    Motion,
    pose_at,
    sample_body,
    smoothstep,
    stride_per_cycle,
)
from training.synth.text import (
    FLOORS,
    HAIR,
    SHIRTS,
    SKIN,
    TROUSERS,
    WALLS,
    CaptionStyle,
    sample_style,
    sample_verb,
    state_clause,
)

RGB = tuple[int, int, int]
SIZES: tuple[tuple[int, int], ...] = (
    (320, 240),
    (256, 256),
    (360, 270),
    (384, 288),
    (400, 300),
    (480, 272),
    (432, 240),
    (240, 320),
    (288, 384),
    (480, 360),
    (640, 360),
)  # fmt: skip (width, height)
# frames per cycle at ~30 fps, and the share of the cycle its first half takes
TEMPO: dict[str, tuple[float, float, float]] = {
    "jumping_jacks": (14, 30, 0.40), "squats": (30, 60, 0.60), "wave_one_arm": (10, 24, 0.5),
    "wave_both_arms": (16, 36, 0.5), "arm_circles": (14, 36, 0.5), "walking": (18, 32, 0.5),
    "punching": (10, 24, 0.30), "lunges": (30, 60, 0.58), "jumping": (30, 50, 0.5),
    "bowling": (40, 70, 0.5),
}  # fmt: skip
# view -> weight, per action (walking across is always side-on or three-quarter)
VIEWS: dict[str, dict[str, float]] = {
    "jumping_jacks": {"front": 0.5, "three_quarter": 0.3, "back": 0.2},
    "squats": {"front": 0.3, "three_quarter": 0.35, "side": 0.35},
    "wave_one_arm": {"front": 0.5, "three_quarter": 0.4, "back": 0.1},
    "wave_both_arms": {"front": 0.5, "three_quarter": 0.3, "back": 0.2},
    "arm_circles": {"front": 0.2, "three_quarter": 0.4, "side": 0.4},
    "walking": {"front": 0.3, "three_quarter": 0.35, "side": 0.35},
    "punching": {"front": 0.25, "three_quarter": 0.45, "side": 0.3},
    "lunges": {"three_quarter": 0.4, "side": 0.6},
    "jumping": {"front": 0.35, "three_quarter": 0.35, "side": 0.3},
    "bowling": {"three_quarter": 0.4, "side": 0.6},
}
YAW_DEG = {"front": (0, 15), "three_quarter": (45, 10), "side": (85, 8), "back": (180, 15)}
BACKGROUNDS = ("flat", "gradient", "stripes", "tiles", "noise")
BLEND = 12  # frames a switch between two actions takes (0.4 s at 30 fps)
LEAD = 6  # frames a label names the coming action ahead of its motion (prepare's default stride)
SEGMENT = (25, 45)  # frames one action lasts in a clip that switches
# bowling holds a ball and jumping is framed for its height: neither switches in or out
SWITCHING = tuple(a for a in ACTIONS if a not in ("bowling", "jumping"))


@dataclass(frozen=True)
class Look:
    """Appearance of the person."""

    gender: str  # man / woman / person (caption word; long hair is likelier for "woman")
    skin: RGB
    hair: RGB
    long_hair: bool
    shirt: RGB
    shirt_name: str
    trousers: RGB
    trousers_name: str
    shorts: bool
    long_sleeves: bool
    shoes: RGB
    ball: RGB  # bowling ball


@dataclass(frozen=True)
class Scene:
    """Background and camera framing; pixels are those of the written frame."""

    width: int
    height: int
    kind: str  # one of BACKGROUNDS
    wall: RGB
    wall_name: str
    floor: RGB | None
    floor_name: str | None
    floor_line: float  # y where the wall meets the floor (pixels)
    texture_seed: int
    scale: float  # pixels per body unit (standing height ~1)
    cx: float  # x of the body's origin at frame 0 (pixels)
    floor_y: float  # y of the floor under the feet (pixels)
    light: float  # -1: lit from the left, +1: from the right


@dataclass(frozen=True)
class Switch:
    """From frame `start` on (over BLEND frames) the person does `motion` instead."""

    start: int
    motion: Motion
    style: CaptionStyle


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip."""

    seed: int
    index: int
    nframes: int
    body: Body
    motion: Motion
    look: Look
    scene: Scene
    shutter: float  # share of the frame interval the shutter stays open
    train: bool
    style: CaptionStyle
    switches: tuple[Switch, ...] = ()

    @property
    def pose(self) -> str:
        return view_label(self.motion.yaw)

    def segment(self, t: float) -> tuple[Motion, CaptionStyle]:
        """The motion (and its caption wording) in charge at frame t; a blend counts as the
        motion it blends into."""
        out = (self.motion, self.style)
        for s in self.switches:
            if t >= s.start:
                out = (s.motion, s.style)
        return out

    def action_at(self, i: int) -> str:
        """Frame i's label: the action of frame i + LEAD."""
        return self.segment(i + LEAD)[0].action

    def points(self, t: float) -> np.ndarray:
        """World points at (fractional) frame t, blended across a switch (segments outlast
        BLEND, so at most one blend runs at a time)."""
        motion, blend = self.motion, None
        for s in self.switches:
            if t >= s.start + BLEND:
                motion = s.motion
            elif t > s.start:
                blend = s
        pts = pose_at(self.body, motion, t)
        if blend is None:
            return pts
        w = smoothstep((t - blend.start) / BLEND)
        return (1 - w) * pts + w * pose_at(self.body, blend.motion, t)


def view_label(yaw: float) -> str:
    """Penn-Action-style view label: front / back / left / right (the way the person faces
    in the image)."""
    deg = (math.degrees(yaw) + 180.0) % 360.0 - 180.0
    if abs(deg) <= 30:
        return "front"
    if abs(deg) >= 150:
        return "back"
    return "right" if deg > 0 else "left"


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of clip `index`: depends only on (seed, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _jitter(rng: np.random.Generator, c: RGB, amount: int = 12) -> RGB:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]


def _far(c: RGB, others: list[RGB], dist: float) -> bool:
    return all(math.dist(c, o) >= dist for o in others)


def _pick(rng: np.random.Generator, names: list[str]) -> str:
    return names[int(rng.integers(len(names)))]


def sample_look(rng: np.random.Generator) -> Look:
    gender = _pick(rng, ["man", "woman", "person"])
    shirt, trousers = _pick(rng, list(SHIRTS)), _pick(rng, list(TROUSERS))
    hair = _pick(rng, list(HAIR))
    return Look(
        gender=gender,
        skin=_jitter(rng, SKIN[int(rng.integers(len(SKIN)))], 8),
        hair=_jitter(rng, HAIR[hair], 8),
        long_hair=bool(rng.random() < (0.7 if gender == "woman" else 0.1)),
        shirt=_jitter(rng, SHIRTS[shirt]),
        shirt_name=shirt,
        trousers=_jitter(rng, TROUSERS[trousers]),
        trousers_name=trousers,
        shorts=bool(rng.random() < 0.25),
        long_sleeves=bool(rng.random() < 0.45),
        shoes=_jitter(rng, [(30, 30, 30), (230, 230, 230), (90, 55, 30)][int(rng.integers(3))], 6),
        ball=[(30, 40, 120), (20, 20, 20), (160, 20, 30)][int(rng.integers(3))],
    )


def _sample_yaw(rng: np.random.Generator, action: str) -> float:
    views = VIEWS[action]
    view = list(views)[
        int(rng.choice(len(views), p=np.array(list(views.values())) / sum(views.values())))
    ]
    centre, spread = YAW_DEG[view]
    sign = 1 if rng.random() < 0.5 else -1
    return math.radians(sign * centre + rng.uniform(-spread, spread))


def _sample_motion(rng: np.random.Generator, action: str) -> Motion:
    lo, hi, asym = TEMPO[action]
    yaw = _sample_yaw(rng, action)
    direction = 1 if rng.random() < 0.5 else -1
    if action == "walking":
        direction = int(rng.random() < 0.65)  # 1: walks across the frame, 0: in place
        if direction:
            yaw = math.copysign(math.radians(rng.uniform(55, 95)), rng.random() - 0.5)
    return Motion(action=action, period=float(rng.uniform(lo, hi)), phase0=float(rng.random()),
                  asym=float(np.clip(asym + rng.uniform(-0.04, 0.04), 0.2, 0.8)),
                  amp=float(rng.uniform(0.8, 1.1)), side=1 if rng.random() < 0.5 else -1,
                  direction=direction, yaw=yaw)  # fmt: skip


def _sample_scene(rng: np.random.Generator, look: Look, motion: Motion, body: Body,
                  nframes: int) -> tuple[Scene, Motion]:  # fmt: skip
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    walls = [n for n, c in WALLS.items() if _far(c, [look.shirt, look.trousers, look.skin], 70)]
    wall_name = _pick(rng, walls or list(WALLS))
    floors = [
        n
        for n, c in FLOORS.items()
        if _far(c, [look.trousers, look.shoes, look.skin, WALLS[wall_name]], 60)
    ]
    floor_name = _pick(rng, floors) if floors and rng.random() < 0.7 else None
    framing = rng.random()
    lift = 0.25 if motion.action == "jumping" else 0.06
    if framing < 0.1:  # close-up: head or feet cut off
        scale, floor_y, cx = (
            height * rng.uniform(0.9, 1.25),
            height * rng.uniform(0.95, 1.25),
            width * rng.uniform(0.35, 0.65),
        )
    else:
        floor_y = height * rng.uniform(0.82, 0.97)
        scale = min(height * rng.uniform(0.5, 0.85), (floor_y - 0.02 * height) / (1.0 + lift))
        edge = rng.uniform(0.0, 0.12)
        cx = width * (
            rng.uniform(0.3, 0.7) if framing < 0.9 else (edge if rng.random() < 0.5 else 1 - edge)
        )
    if motion.action == "walking" and motion.direction:
        # Walk across: slow down if needed so the path spans at most 3/4 of the frame width.
        speed = stride_per_cycle(body, motion) * abs(math.sin(motion.yaw)) * scale  # px per cycle
        period = max(motion.period, speed * nframes / (0.75 * width))
        motion = replace(motion, period=period)
        travel = speed * nframes / period * math.copysign(1.0, math.sin(motion.yaw))
        cx = width / 2 - travel / 2 + rng.uniform(-0.05, 0.05) * width
    scene = Scene(width=width, height=height, kind=_pick(rng, list(BACKGROUNDS)),
                  wall=_jitter(rng, WALLS[wall_name], 10), wall_name=wall_name,
                  floor=_jitter(rng, FLOORS[floor_name], 10) if floor_name else None,
                  floor_name=floor_name, floor_line=floor_y - scale * rng.uniform(0.03, 0.15),
                  texture_seed=int(rng.integers(2**31)), scale=float(scale), cx=float(cx),
                  floor_y=float(floor_y), light=1.0 if rng.random() < 0.5 else -1.0)  # fmt: skip
    return scene, motion


def _sample_switches(seed: int, index: int, motion: Motion, style: CaptionStyle,
                     nframes: int, share: float) -> tuple[Switch, ...]:  # fmt: skip
    """With probability `share` (and an action that can switch), the clip's later actions."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))
    if (
        rng.random() >= share
        or motion.action not in SWITCHING
        or (motion.action == "walking" and motion.direction)
    ):
        return ()
    out: list[Switch] = []
    start, prev = int(rng.integers(SEGMENT[0], SEGMENT[1] + 1)), motion.action
    while start < nframes - BLEND:
        action = str(rng.choice([a for a in SWITCHING if a != prev]))
        m = replace(_sample_motion(rng, action), yaw=motion.yaw)
        if action == "walking":
            m = replace(m, direction=0)  # in place: a walk across would jump back to the start
        side = "left" if m.side > 0 else "right"
        circle = "backward" if m.direction > 0 else "forward"
        verb = sample_verb(rng, action, side=side, walk_dir="in place", circle=circle)
        state = style.state and state_clause(action, 0.25) is not None
        out.append(Switch(start, m, replace(style, verb=verb, state=state)))
        start, prev = start + int(rng.integers(SEGMENT[0], SEGMENT[1] + 1)), action
    return tuple(out)


def sample_spec(seed: int, index: int, frames: tuple[int, int] = (60, 120),
                action: str | None = None, switch_share: float = 0.0) -> ClipSpec:  # fmt: skip
    """Draw clip `index` of the data set made with `seed` (frames: inclusive length range)."""
    if not 0.0 <= switch_share <= 1.0:
        raise ValueError(f"switch share must be in [0, 1], got {switch_share}")
    lo, hi = frames
    if not 1 <= lo <= hi:
        raise ValueError(f"frames range must satisfy 1 <= min <= max, got {frames}")
    if action is not None and action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {list(ACTIONS)}")
    rng = clip_rng(seed, index)
    chosen = ACTIONS[int(rng.integers(len(ACTIONS)))]
    action = action or chosen
    nframes = int(rng.integers(lo, hi + 1))
    body, look = sample_body(rng), sample_look(rng)
    motion = _sample_motion(rng, action)
    scene, motion = _sample_scene(rng, look, motion, body, nframes)
    shutter, train = float(rng.uniform(0.4, 1.0)), bool(rng.random() < 0.8)
    side = "left" if motion.side > 0 else "right"
    walk_dir = (
        ("to the right" if math.sin(motion.yaw) > 0 else "to the left")
        if motion.direction
        else "in place"
    )
    style = sample_style(
        rng,
        gender=look.gender,
        shirt=look.shirt_name,
        trousers=look.trousers_name,
        shorts=look.shorts,
        long_sleeves=look.long_sleeves,
        action=action,
        wall=scene.wall_name,
        floor=scene.floor_name,
        pose=view_label(motion.yaw),
        side=side,
        walk_dir=walk_dir,
        circle="backward" if motion.direction > 0 else "forward",
    )
    switches = (
        _sample_switches(seed, index, motion, style, nframes, switch_share) if switch_share else ()
    )
    return ClipSpec(seed=seed, index=index, nframes=nframes, body=body, motion=motion, look=look,
                    scene=scene, shutter=shutter, train=train, style=style,
                    switches=switches)  # fmt: skip
