"""Shared fixtures: the default model, pulled once into the user's cache (or PLAN_ENGINE_CACHE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def model_path() -> Path:
    from engine.model.registry import resolve
    return resolve(None)


@pytest.fixture(scope="session")
def model_file(model_path):
    from engine.model.gguf_file import ModelFile
    return ModelFile(model_path)


@pytest.fixture(scope="session")
def loaded_model(model_path):
    """The default model with f32 weights on the CPU backend, shared by every test in the session."""
    from engine.runtime.generate import LoadedModel
    model = LoadedModel(model_path, backend="cpu", weights="f32")
    yield model
    model.close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A synthetic one-layer llama GGUF (tests/tiny_gguf.py): the whole engine in milliseconds."""
    from tiny_gguf import write_tiny_gguf
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf")


@pytest.fixture(scope="session")
def generation_reference() -> list[dict]:
    """shared/reference/smollm2-135m-q4_1/generation.json (hf_f32 and llama.cpp numerics)."""
    return json.loads((FIXTURES / "generation.json").read_text())["cases"]


@pytest.fixture(scope="session")
def pg():
    """A PostgreSQL server for the session (tests/postgres_server.py); skipped without one."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")
    from postgres_server import start_postgres
    server = start_postgres()
    yield server
    server.remove()


@pytest.fixture
def dsn(pg) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg.create_database()
