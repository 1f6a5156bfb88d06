"""Colour palettes and captions for the synthetic clips.

Every caption names its action with one of `action_keywords(action)` verbatim, and no
caption of one action contains a keyword of another (tests check this), so evaluation
can read the action back out of a generated caption. Wording varies per clip (subject,
clothing words, verb phrase, background phrase, order); a few actions add a clause per
frame that says what the body is doing right now (e.g. "arms going up").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> RGB. Clothing and background colours are drawn from these, so captions are true.
SHIRTS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40), "blue": (40, 80, 200), "green": (40, 150, 60),
    "yellow": (230, 200, 40), "white": (235, 235, 235), "black": (30, 30, 32),
    "orange": (240, 130, 30), "purple": (120, 50, 160), "pink": (235, 120, 170),
    "grey": (128, 128, 128), "teal": (30, 140, 140),
}  # fmt: skip
TROUSERS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 60, 120), "black": (25, 25, 28), "grey": (100, 100, 105),
    "brown": (100, 70, 40), "beige": (200, 180, 140), "white": (225, 225, 225),
    "green": (60, 90, 50), "red": (150, 30, 30),
}  # fmt: skip
WALLS: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 150), "white": (225, 225, 220), "beige": (215, 200, 170),
    "light blue": (170, 200, 230), "dark blue": (40, 50, 90), "green": (120, 170, 120),
    "brown": (120, 90, 60), "yellow": (230, 215, 140), "pink": (230, 190, 200),
    "dark grey": (60, 62, 66),
}  # fmt: skip
FLOORS: dict[str, tuple[int, int, int]] = {
    "wooden": (150, 105, 60), "grey": (110, 110, 110), "dark": (50, 45, 45),
    "green": (70, 120, 60), "white": (210, 210, 205), "blue": (60, 90, 140),
}  # fmt: skip
SKIN: tuple[tuple[int, int, int], ...] = (
    (255, 220, 190), (240, 195, 160), (215, 165, 125), (180, 130, 90), (140, 95, 60),
    (100, 65, 40),
)  # fmt: skip
HAIR: dict[str, tuple[int, int, int]] = {
    "black": (25, 20, 20), "brown": (95, 60, 35), "blond": (215, 185, 110),
    "grey": (160, 160, 160), "red": (160, 70, 30),
}  # fmt: skip

KEYWORDS: dict[str, tuple[str, ...]] = {
    "jumping_jacks": ("jumping jacks",),
    "squats": ("squat",),
    "wave_one_arm": ("waves one", "waving one"),
    "wave_both_arms": ("waves both", "waving both"),
    "arm_circles": ("arm circles",),
    "walking": ("walk",),
    "punching": ("punch",),
    "lunges": ("lunge", "lunging"),
    "jumping": ("jumps up", "jumping up", "vertical jump"),
    "bowling": ("bowl",),
}

# Verb phrases per action ({side}: "left"/"right" arm or leg; {dir}: walking direction).
VERBS: dict[str, tuple[str, ...]] = {
    "jumping_jacks": ("does jumping jacks", "is doing jumping jacks", "performs jumping jacks"),
    "squats": ("does squats", "is doing squats", "squats down and up", "performs bodyweight squats"),
    "wave_one_arm": ("waves one arm", "is waving one arm overhead", "waves one hand",
                     "is waving one hand in the air"),
    "wave_both_arms": ("waves both arms", "is waving both arms overhead",
                       "waves both hands in the air"),
    "arm_circles": ("does arm circles", "makes big arm circles", "is doing {circle} arm circles"),
    "walking": ("walks {dir}", "is walking {dir}", "walks steadily {dir}"),
    "punching": ("punches with the {side} fist", "throws {side} punches",
                 "is punching forward with the {side} arm"),
    "lunges": ("does lunges with the {side} leg", "is lunging forward", "steps into a lunge"),
    "jumping": ("jumps up and down", "is jumping up in place", "does vertical jumps"),
    "bowling": ("bowls", "is bowling", "practises a bowling swing", "swings a bowling ball"),
}  # fmt: skip
SUBJECTS = {"man": ("a man", "a young man", "a guy"), "woman": ("a woman", "a young woman", "a lady"),
            "person": ("a person", "someone", "an athlete")}  # fmt: skip
BACKDROPS = ("in front of a {wall} wall", "against a {wall} background", "in a room with {wall} walls",
             "by a {wall} wall")  # fmt: skip
FLOOR_BACKDROPS = ("on a {floor} floor", "in a room with a {floor} floor")
VIEWS = {"front": ("facing the camera", "seen from the front"),
         "back": ("seen from behind", "with the back to the camera"),
         "left": ("facing left", "seen from the side"), "right": ("facing right", "seen from the side")}  # fmt: skip


def action_keywords(action: str) -> list[str]:
    """Lower-case words that identify `action` in a caption (any one of them appears)."""
    try:
        return list(KEYWORDS[action])
    except KeyError:
        raise ValueError(f"unknown action {action!r}; known: {sorted(KEYWORDS)}") from None


def action_from_caption(caption: str) -> str | None:
    """The action whose keyword appears in `caption`, or None if none or several do."""
    text = caption.lower()
    found = [a for a, kws in KEYWORDS.items() if any(k in text for k in kws)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class CaptionStyle:
    """One clip's wording choices, drawn once so the clip's captions stay consistent."""

    subject: str
    clothes: str
    verb: str
    backdrop: str
    view: str | None
    order: int  # 0: subject first, 1: backdrop first
    state: bool  # add a per-frame clause about the current phase


def sample_style(rng: np.random.Generator, *, gender: str, shirt: str, trousers: str,
                 shorts: bool, long_sleeves: bool, action: str, wall: str,
                 floor: str | None, pose: str, side: str, walk_dir: str, circle: str) -> CaptionStyle:  # fmt: skip
    """Draw one clip's caption wording."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    top = pick(
        ("shirt", "t-shirt", "top")
        if not long_sleeves
        else ("shirt", "sweater", "long-sleeved top")
    )
    bottom = (
        "shorts"
        if shorts
        else ("jeans" if trousers == "blue" and rng.random() < 0.5 else pick(("trousers", "pants")))
    )
    a_shirt = f"{'an' if shirt[0] in 'aeiou' else 'a'} {shirt}"
    clothes = pick((f"in {a_shirt} {top} and {trousers} {bottom}", f"wearing {a_shirt} {top}",
                    f"in {a_shirt} {top}", f"dressed in {shirt} and {trousers}"))  # fmt: skip
    verb = sample_verb(rng, action, side=side, walk_dir=walk_dir, circle=circle)
    backs = list(BACKDROPS) + (list(FLOOR_BACKDROPS) if floor else [])
    backdrop = pick(backs).format(wall=wall, floor=floor)
    subject, order = pick(SUBJECTS[gender]), int(rng.random() < 0.25)
    state = bool(rng.random() < 0.6) and state_clause(action, 0.25) is not None
    # at most one trailing clause, so captions stay within ~30 GPT-2 tokens
    view = pick(VIEWS[pose]) if not state and rng.random() < 0.5 else None
    return CaptionStyle(subject, clothes, verb, backdrop, view, order, state)


def sample_verb(rng: np.random.Generator, action: str, *, side: str, walk_dir: str,
                circle: str) -> str:  # fmt: skip
    """One of the action's verb phrases, with its side / walking direction / circle filled in."""
    verbs = VERBS[action]
    return verbs[int(rng.integers(len(verbs)))].format(side=side, dir=walk_dir, circle=circle)


def state_clause(action: str, u: float) -> str | None:
    """What the body is doing at warped phase u (None when there is nothing to add)."""
    rising = u < 0.5
    if action == "jumping_jacks":
        return "arms going up" if rising else "arms coming down"
    if action in ("squats", "lunges"):
        return "going down" if rising else "coming back up"
    if action == "punching":
        return "fist going out" if rising else "pulling the fist back"
    if action == "jumping":
        return ("crouching" if u < 0.3 else "pushing off" if u < 0.4 else
                "in the air" if u < 0.7 else "landing")  # fmt: skip
    if action == "bowling":
        return "swinging back" if u < 0.4 else "swinging forward" if u < 0.72 else "recovering"
    return None


def caption(style: CaptionStyle, action: str, u: float) -> str:
    """The caption of one frame at warped phase u."""
    core = f"{style.subject} {style.clothes} {style.verb}"
    text = f"{style.backdrop}, {core}" if style.order else f"{core} {style.backdrop}"
    extra = [c for c in ((state_clause(action, u) if style.state else None), style.view) if c]
    return ", ".join([text, *extra])
