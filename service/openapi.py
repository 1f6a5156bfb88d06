"""The OpenAPI document: FastAPI's, plus what the route signatures cannot say.

- `frame` is one of the image types the service takes (multipart `encoding`), never empty;
- `coords` is a JSON part of 13 `[x, y, visible]` joints, not any string;
- the limits that come from `Settings` (steps, temperature, seed, caption length);
- links from `/predict`'s `id` to `/rollout.gif` and `/next_frame.png`, so a client (or
  a contract fuzzer) knows where a prediction's id goes.

The server checks the same limits (`service.predictor`); `tests/service/
test_service_contract.py` fuzzes the app against this document to keep the two in step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from m2core.modalities import NUM_JOINTS
from service.schemas import MAX_COORD, MAX_SEED
from service.settings import Settings

Schema = dict[str, Any]


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the amended document at /openapi.json (and /docs), built once on first use."""
    fastapi_openapi = app.openapi  # builds, caches in app.openapi_schema, returns it

    def openapi() -> Schema:
        if app.openapi_schema is None:
            amend(fastapi_openapi(), settings)  # in place: the cached dict is the one served
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def amend(doc: Schema, settings: Settings) -> Schema:
    paths = doc["paths"]
    predict = paths["/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]
    body = _resolve(doc, form["schema"])["properties"]
    image_types = ", ".join(f"image/{f.lower()}" for f in settings.allowed_formats)
    form["encoding"] = {
        "frame": {"contentType": image_types},
        "coords": {"contentType": "application/json"},
    }
    body["frame"] = {
        "type": "string", "format": "binary", "minLength": 1,
        "description": f"the frame: {image_types}",
    }  # fmt: skip
    body["coords"] = {**body["coords"], "anyOf": [_skeleton(), {"type": "null"}]}
    body["steps"].update(minimum=1, maximum=settings.max_steps)
    _limit(body["temperature"], minimum=0.0, maximum=settings.max_temperature)
    _limit(body["seed"], minimum=0, maximum=MAX_SEED)
    _limit(body["caption"], maxLength=settings.max_caption_chars)
    actions = _actions(settings)
    if actions:  # the checkpoint's action names are the only values it takes
        _limit(body["action"], enum=actions)
    else:  # a checkpoint without an action modality takes no action
        body.pop("action", None)

    next_frame = paths["/next_frame.png"]["get"]
    step = next(p for p in next_frame["parameters"] if p["name"] == "step")
    step["schema"].update(minimum=1, maximum=settings.max_steps)

    # Where a prediction's id goes (its PNG's `step` defaults to 1, which every prediction has).
    predict["responses"]["200"]["links"] = {
        "RolloutGif": {
            "operationId": paths["/rollout.gif"]["get"]["operationId"],
            "parameters": {"id": "$response.body#/id"},
            "description": "the predicted motion as a GIF",
        },
        "NextFrame": {
            "operationId": next_frame["operationId"],
            "parameters": {"id": "$response.body#/id"},
            "description": "the predicted next key frame",
        },
    }
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {}}
    return doc


def _skeleton() -> Schema:
    """13 joints `[x, y, visible]`: x and y in the upload's pixels, visible 0/1 (JSON
    true/false pass too, as `schemas.parse_coords` takes them)."""
    coord = {"type": "number", "minimum": -MAX_COORD, "maximum": MAX_COORD}
    joint = {
        "type": "array", "minItems": 3, "maxItems": 3,
        "prefixItems": [coord, coord, {"enum": [0, 1, False, True]}],
    }  # fmt: skip
    return {"type": "array", "minItems": NUM_JOINTS, "maxItems": NUM_JOINTS, "items": joint}


def _actions(settings: Settings) -> list[str]:
    """The action names of a format-2 checkpoint's config.json ([] for format 1 or unreadable)."""
    try:
        meta = json.loads((Path(settings.checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict) or (meta.get("model") or {}).get("format") != 2:
        return []
    return [str(a) for a in ((meta.get("extra") or {}).get("data") or {}).get("actions") or []]


def _limit(prop: Schema, **bounds: Any) -> None:
    """Bounds on the non-null branch of FastAPI's `anyOf: [T, null]` for `T | None`."""
    branch = next(s for s in prop["anyOf"] if s.get("type") != "null")
    branch.update(bounds)


def _resolve(doc: Schema, schema: Schema) -> Schema:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node
