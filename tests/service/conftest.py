"""Fixtures of the service tests: the tiny real checkpoint and a running in-process app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from svc_helpers import make_checkpoint, run_server, settings_for, wait_ready

from service.app import create_app


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("m2-tiny") / "ckpt")


@pytest.fixture(scope="module")
def client(checkpoint_dir: Path) -> Iterator[TestClient]:
    """The real app on the tiny checkpoint, warmed up."""
    with TestClient(create_app(settings_for(checkpoint_dir))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="session")
def live_server(checkpoint_dir: Path) -> Iterator[str]:
    """`m2 serve` as a real subprocess on a free port; yields its base URL."""
    with run_server(checkpoint_dir) as url:
        yield url
