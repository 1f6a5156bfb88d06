"""The API contract: schemathesis fuzzes the real app in-process against its own OpenAPI
document with every check on (a schema-valid request gets a 2xx, an invalid one a 4xx,
answers match their declared status, type and schema), then follows the links from
`/predict`'s `id` to the GIF and the PNG as a client would.

Deterministic (derandomized Hypothesis, no example database) and small: ~30 generated
cases per operation, schemathesis' coverage cases, 15 short stateful scenarios.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import CHECKS, load_all_checks
from starlette.testclient import TestClient
from svc_helpers import settings_for

from service.app import create_app
from service.settings import Settings

FUZZ = settings(
    max_examples=30,
    deadline=None,  # a prediction on a loaded 2-core CPU takes what it takes
    derandomize=True,
    database=None,
)
load_all_checks()
ALL_CHECKS = CHECKS.get_all()  # what `schemathesis run --checks all` runs


def _app(checkpoint: Path) -> FastAPI:
    return create_app(settings_for(checkpoint, warmup=False))  # ready at once


@st.composite
def _images(draw: st.DrawFn, fmt: str) -> bytes:
    """Small real images: a schema-valid frame is one the service must accept."""
    w, h, seed = draw(st.integers(1, 48)), draw(st.integers(1, 48)), draw(st.integers(0, 999))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


# The frame's media types, as the document lists them (`encoding.frame.contentType`).
for _fmt in Settings.model_fields["allowed_formats"].default:
    schemathesis.openapi.media_type(f"image/{_fmt.lower()}", _images(_fmt))

# Building the app reads no checkpoint: the document is the one the fixture's app serves
# (checked below). schemathesis wants it at collection time, before fixtures exist.
DOC = _app(Path("unused")).openapi()
schema = schemathesis.openapi.from_dict(DOC)


@pytest.fixture(scope="module")
def app(checkpoint_dir: Path) -> FastAPI:
    return _app(checkpoint_dir)


def test_the_fuzzed_document_is_the_served_one(app: FastAPI):
    assert TestClient(app).get("/openapi.json").json() == DOC


@schema.parametrize()
@FUZZ
def test_every_operation_keeps_its_contract(case: schemathesis.Case, app: FastAPI):
    case.call_and_validate(app=app, checks=ALL_CHECKS)


def test_predict_documents_its_frame_types_limits_and_links():
    predict = DOC["paths"]["/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]
    assert form["encoding"]["frame"]["contentType"].split(", ") == [
        "image/png", "image/jpeg", "image/webp", "image/bmp"
    ]  # fmt: skip
    body = DOC["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert body["frame"]["minLength"] == 1  # an empty upload is not a frame
    assert (body["steps"]["minimum"], body["steps"]["maximum"]) == (1, 4)  # M2_MAX_STEPS
    links = predict["responses"]["200"]["links"]
    targets = {
        DOC["paths"][p]["get"]["operationId"]: p for p in ("/rollout.gif", "/next_frame.png")
    }
    assert {targets[link["operationId"]] for link in links.values()} == set(targets.values())
    assert all(link["parameters"]["id"] == "$response.body#/id" for link in links.values())


def test_links_lead_from_a_prediction_to_its_gif_and_png(app: FastAPI):
    answered: list[tuple[str, int]] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict:
            return {"app": app}

        def after_call(self, response, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            answered.append((case.path, response.status_code))

    # schemathesis follows a link's id with its own coin (92%); 15 scenarios make a dozen
    # GIF and a handful of PNG calls, so "never followed" does not happen in practice.
    Workflow.run(settings=settings(FUZZ, max_examples=15, stateful_step_count=3))
    assert ("/rollout.gif", 200) in answered and ("/next_frame.png", 200) in answered
