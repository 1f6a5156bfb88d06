"""Per-modality adapters (DESIGN section 14): how a modality enters and leaves the trunk.

One class per modality kind, built from the registry entry. Every adapter works on the
filled slots of its modality, flattened over the batch (`Slots`), and owns:
- `embed_input(s, ctx)` -> (n, D): an encoder token (value + position);
- `embed_query(s)` -> (n, D): a decoder query (mask or revealed token + position, plus the
  present token's value where the modality has a present one);
- `loss(h, s, labels, ctx)` -> (summed loss, count) over the slots with a label;
- `readout(h, s, ctx, temperature, gens)` -> (ids (n,), confidence (n,) in [0, 1]).
The model adds the modality embedding; the trunk never looks inside a modality.
"""

from __future__ import annotations

from m2core.adapters.base import Adapter, Inputs, Slots
from m2core.adapters.image import ImageAdapter
from m2core.adapters.label import LabelAdapter
from m2core.adapters.pose import PoseAdapter
from m2core.adapters.text import TextAdapter
from m2core.modalities import Modality

KINDS = {"image": ImageAdapter, "pose": PoseAdapter, "text": TextAdapter, "label": LabelAdapter}


def build_adapter(
    mod: Modality, dim: int, present: Modality | None = None, **options: object
) -> Adapter:
    """The adapter of one registry entry; `present` is the modality a future one starts from;
    `options`, the model config's adapter fields (each kind takes the ones it knows)."""
    return KINDS[mod.kind](mod, dim, present=present, **options)


__all__ = ["KINDS", "Adapter", "Inputs", "Slots", "build_adapter"]
