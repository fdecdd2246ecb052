"""Artifacts: folders that stages hand each other, written atomically, described by a manifest.

manifest.json says what produced the folder (stage, command, config), from what (parent artifacts and
source files, by hash), library versions, and the sha256 of every file inside. `verify` checks them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact folder that is missing, incomplete or does not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target. A device or pipe
    (`--out /dev/null`, `/dev/stdout`) is written as itself: renaming over it would replace the device."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it is renamed into place, on error removed.

    A crash (even kill -9) leaves only a `.final.tmp-*` folder, never a half-written `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            if not overwrite:
                raise ArtifactError(f"{final}: already exists (pass overwrite to replace it)")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions(
    names=("torch", "transformers", "peft", "safetensors", "numpy", "emoverse-edge"),
) -> dict[str, str]:
    out = {}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[n] = metadata.version(n)
    return out


# The instruction-set extensions that pick onnxruntime's and PyTorch's kernels here (int8 dot products, bf16,
# AMX; on ARM the dot-product and int8-matmul extensions): two CPUs with one model name may differ in them (an
# "AMD EPYC" with AVX-512 BF16 + VNNI and one with AVX2 only have both been seen), and so do their timings
# and the integer kernels' exactness (runtime.ort.session_options).
KERNEL_FLAGS = (
    "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
    "asimddp", "i8mm", "bf16", "sve",
)  # fmt: skip


def _read_cpuinfo(cpuinfo: Path) -> tuple[str, list[str] | None]:
    """(model name or '', KERNEL_FLAGS present or None where no flags line) from a /proc/cpuinfo text."""
    name, flags = "", None
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not name:
                name = value
            elif key in ("flags", "Features") and flags is None:  # x86 / ARM
                flags = [f for f in KERNEL_FLAGS if f in value.split()]
    return name, flags


def cpu_kernel_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str] | None:
    """This CPU's KERNEL_FLAGS, in KERNEL_FLAGS' order; None where /proc/cpuinfo names no flags (not Linux)."""
    return _read_cpuinfo(cpuinfo)[1]


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model and its KERNEL_FLAGS, e.g. 'AMD EPYC (avx2)' (timings and throughput are only comparable
    on the same one)."""
    name, flags = _read_cpuinfo(cpuinfo)
    name = name or platform.processor() or platform.machine()
    return name if flags is None else f"{name} ({', '.join(flags) or 'baseline SIMD only'})"


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX-512 BF16, AMX, ARM BF16); True where unknown."""
    flags = cpu_kernel_flags()
    return flags is None or bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def autocast_precision(precision: str, device_type: str) -> str:
    """The precision a request for `precision` runs at on `device_type`: bf16 autocast on a CPU without bf16
    instructions falls back to fp32, with a warning. Why: there PyTorch emulates bf16 matmuls; measured on an
    AVX2-only AMD EPYC (torch 2.13; scripts/bf16_ab.py -> docs/results/bf16-ab-epyc-avx2.json), a SmolLM2 MLP
    block's training step ran 34x and its forward 7.5x slower in bf16 than in fp32."""
    if precision == "bf16" and device_type == "cpu" and not cpu_runs_bf16():
        import warnings

        warnings.warn(
            f"precision=bf16: this CPU ({cpu_name()}) has no bf16 instructions (AVX-512 BF16, AMX or ARM BF16), "
            "where bf16 autocast is emulated and several times slower; running in fp32 (recorded as the precision)",
            stacklevel=2,
        )
        return "fp32"
    return precision


def folder_bytes(folder: str | os.PathLike) -> int:
    """Size on disk of every file below `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(
    folder: str | os.PathLike,
    *,
    kind: str,
    producer: dict,
    inputs: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Hash every file in `folder` and write manifest.json (atomically) last."""
    folder = Path(folder)
    manifest = {
        "format": "emoverse-artifact/1",
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "producer": producer,
        "inputs": inputs or {},
        "libraries": library_versions(),
        "python": platform.python_version(),
        "files": file_hashes(folder),
        **(extra or {}),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_digest(manifest: dict) -> str:
    """One hash naming an artifact's content: the sha256 of its sorted file-hash table."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not an emoverse artifact (or an interrupted write)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}:{e.lineno}: invalid manifest JSON: {e.msg}") from None


# A model a stage can take: the full form (merged weights) or the adapter-form release.
MODEL_KINDS = ("emoverse-model", "emoverse-adapter")


def verify(folder: str | os.PathLike, *, kind: str | tuple[str, ...] | None = None) -> dict:
    """Check every file against the manifest; no file may be missing, changed, extra or outside."""
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and manifest.get("kind") not in kinds:
        raise ArtifactError(
            f"{folder}: is a {manifest.get('kind')!r} artifact, expected {' or '.join(map(repr, kinds))}"
        )
    files = manifest.get("files", {})
    for rel, digest in files.items():
        p = (folder / rel).resolve()
        if folder not in p.parents:
            raise ArtifactError(f"{folder}/{MANIFEST}: path {rel!r} escapes the artifact folder")
        if not p.is_file():
            raise ArtifactError(f"{folder}: {rel} listed in the manifest is missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{folder}: {rel} does not match its manifest hash (modified or corrupt)")
    # files the manifest announces as built later on the device (TensorRT engines), by glob
    device_built = manifest.get("device_files", [])
    extra = {f for f in set(file_hashes(folder)) - set(files) if not any(fnmatch.fnmatch(f, g) for g in device_built)}
    if extra:
        raise ArtifactError(f"{folder}: files not in the manifest: {sorted(extra)[:5]}")
    return manifest
