"""The container suite's fixtures: the image, built once per session with `make image`, and
containers removed after each test. Every test here is marked `container`, which `make test`
deselects (pyproject.toml's addopts): run them with `pytest tests/deploy -m container`
(`make test-containers`; CI runs .ci/containers.sh first)."""

from __future__ import annotations

import pytest
from podman_cli import Built, Container, build, image_size, unavailable_reason


@pytest.fixture(scope="session")
def podman_ready() -> None:
    if reason := unavailable_reason():
        pytest.skip(reason)


@pytest.fixture(scope="session")
def images(podman_ready, tmp_path_factory) -> Built:
    """The plain and the baked-model image, built once per session (podman's layer cache makes
    a rebuild of unchanged sources take seconds)."""
    built = build(tmp_path_factory.mktemp("build") / "make-image.log")
    print(f"\nmake image on {built.base}: {built.seconds:.0f} s; "
          f"{built.plain} {image_size(built.plain) / 1e6:.0f} MB, {built.baked} {image_size(built.baked) / 1e6:.0f} MB")
    return built


@pytest.fixture
def containers():
    """Containers a test starts (append them); all removed at its end, whatever happened."""
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()
