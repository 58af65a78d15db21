"""Loading model weights from the node cache: find them, check them, map or copy them onto the device.

What it does, in order (all of it blocking: callers run it in a worker thread so probes stay responsive):

1. **Discover** the weight files through a small registry of formats (``FORMATS``, in the spirit of vLLM's
   ``model_loader``): a sharded safetensors model (``model.safetensors.index.json``) or single safetensors files.
2. **Check** every file before a single tensor is built: the safetensors header parses, every tensor's dtype is
   known, its byte range matches its shape and lies inside the file; and, when the model lives in the node cache,
   each file's size (always) and xxh3-128 digest (``verify="digest"``) match the cache manifest.
3. **Load** with one of two strategies (``STRATEGIES``):
   - ``mmap`` (CPU): zero-copy. Each file is mapped privately and tensors are ``torch.frombuffer`` views into it;
     the pages are then faulted in with ``MADV_POPULATE_READ`` in parallel chunks, so that "loaded" honestly
     means "resident" and the first inference does not pay for the disk.
   - ``pipelined`` (CUDA): each file is read with ``preadv`` into a ring of pinned host buffers while the previous
     buffer is copied to the device asynchronously on a side stream: disk reads and host→device copies overlap.
     On CPU the same code runs with ordinary buffers (that is how the tests exercise it).

It never writes to the cache (the root is mounted read-only) and never returns a partially loaded model: any
problem is a ``CorruptModelError`` / ``ModelLoadError`` and nothing is served.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from server.errors import CorruptModelError, ModelLoadError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# A header larger than this is not a real model's: refuse it instead of allocating whatever the file claims.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# --------------------------------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's place in a safetensors file; ``start``/``end`` are relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsFile:
    """A checked safetensors file: its size, where the data region starts, and its tensors."""

    path: Path
    size: int
    data_offset: int
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]

    @property
    def data_len(self) -> int:
        return self.size - self.data_offset


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and check ``path``'s header against its size; ``CorruptModelError`` says what is wrong."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptModelError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CorruptModelError(
                    f"{path}: header claims {header_len} bytes but the file has {size} (truncated or not safetensors)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptModelError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptModelError(f"{path}: safetensors header is not a JSON object")
    data_offset = 8 + header_len
    data_len = size - data_offset
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_len)
    return SafetensorsFile(path=path, size=size, data_offset=data_offset, tensors=tensors, metadata=metadata)


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> TensorSpec:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptModelError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from e
    if dtype not in DTYPES:
        raise CorruptModelError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if any(d < 0 for d in shape) or not 0 <= start <= end:
        raise CorruptModelError(f"{path}: tensor {name!r} has a negative shape or offsets")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != expected:
        raise CorruptModelError(
            f"{path}: tensor {name!r} spans {end - start} bytes but {dtype}{list(shape)} needs {expected}"
        )
    if end > data_len:
        raise CorruptModelError(
            f"{path}: tensor {name!r} ends at byte {end} of the data region but the file only holds {data_len} "
            "(truncated?)"
        )
    return TensorSpec(name=name, dtype=dtype, shape=shape, start=start, end=end)


# --------------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ModelFiles:
    """What a model path holds: its format, its weight files (checked), and its config (``{}`` if none)."""

    model_path: Path
    model_dir: Path
    kind: str
    weights: list[SafetensorsFile]
    config: dict[str, Any]
    extra_files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(w.size for w in self.weights)


class WeightFormat(Protocol):
    """One kind of weight layout: ``detect`` returns the weight files if ``path`` holds this kind, else None."""

    kind: str

    def detect(self, path: Path) -> list[Path] | None: ...


class _SafetensorsIndex:
    kind = "safetensors-sharded"

    def detect(self, path: Path) -> list[Path] | None:
        index = path / INDEX_NAME
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptModelError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptModelError(f"{index}: weight_map is empty or not an object")
        shards: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            if not isinstance(shard, str) or shard.startswith("/") or ".." in shard.split("/") or "\x00" in shard:
                raise CorruptModelError(f"{index}: shard name {shard!r} would escape the model directory")
            shards.append(path / shard)
        return shards


class _SafetensorsFiles:
    kind = "safetensors"

    def detect(self, path: Path) -> list[Path] | None:
        if path.is_file():
            return [path] if path.suffix == ".safetensors" else None
        found = sorted(path.glob("*.safetensors"))
        return found or None


# Tried in order: the index wins over a glob of the same directory.
FORMATS: list[WeightFormat] = [_SafetensorsIndex(), _SafetensorsFiles()]


def discover(model_path: Path) -> ModelFiles:
    """Find and check the weight files at ``model_path`` (a directory or a single file)."""
    if not model_path.exists():
        raise ModelLoadError(f"model path {model_path} does not exist")
    for fmt in FORMATS:
        paths = fmt.detect(model_path)
        if paths is None:
            continue
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise CorruptModelError(f"{model_path}: missing weight file(s) {', '.join(p.name for p in missing)}")
        weights = [read_safetensors_header(p) for p in paths]
        if fmt.kind == "safetensors-sharded":
            _check_index(model_path, weights)
        _check_unique(weights)
        model_dir = model_path if model_path.is_dir() else model_path.parent
        config, extra = _read_config(model_path)
        return ModelFiles(
            model_path=model_path, model_dir=model_dir, kind=fmt.kind, weights=weights, config=config,
            extra_files=extra,
        )
    raise ModelLoadError(
        f"no weights found at {model_path}: expected a .safetensors file, or a directory with {INDEX_NAME} or "
        "*.safetensors files"
    )


def _check_index(model_dir: Path, weights: list[SafetensorsFile]) -> None:
    weight_map: dict[str, str] = json.loads((model_dir / INDEX_NAME).read_text())["weight_map"]
    by_name = {w.path.name: w for w in weights}
    for tensor, shard in weight_map.items():
        shard_file = by_name.get(Path(shard).name)
        if shard_file is None or tensor not in shard_file.tensors:
            raise CorruptModelError(f"{model_dir / INDEX_NAME}: tensor {tensor!r} is not in shard {shard!r}")


def _check_unique(weights: list[SafetensorsFile]) -> None:
    seen: dict[str, Path] = {}
    for w in weights:
        for name in w.tensors:
            if name in seen:
                raise CorruptModelError(f"tensor {name!r} is in both {seen[name]} and {w.path}")
            seen[name] = w.path


def _read_config(model_path: Path) -> tuple[dict[str, Any], list[Path]]:
    config_path = model_path / CONFIG_NAME if model_path.is_dir() else None
    if config_path is None or not config_path.is_file():
        return {}, []
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptModelError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CorruptModelError(f"{config_path}: expected a JSON object")
    return config, [config_path]


# --------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class CacheManifest:
    """The node cache's record of one immutable build (read through ``agent.store.layout``, the agent's own module)."""

    snapshot_dir: Path  # the build's data directory: manifest paths are relative to it
    revision: str
    files: dict[str, dict[str, Any]]  # relpath within the build → {"size", "xxh3_128", ...}
    digest_scheme: str = "xxh3-128-chunked"
    chunk_size: int = 1024 * 1024


def find_manifest(root: Path, model_path: Path) -> CacheManifest | None:
    """The manifest of the build ``model_path`` resolves to, or None outside the node cache.

    The build is immutable and carries its own manifest, so what we check against is exactly what we load.
    """
    from agent.store import layout

    resolved = layout.resolve(root, model_path)
    if resolved is None:
        return None
    try:
        data = layout.read_manifest_data(resolved.build_dir)
    except FileNotFoundError:
        log.warning("no cache manifest in %s: checking headers only", resolved.build_dir)
        return None
    except (OSError, ValueError, TypeError) as e:
        raise CorruptModelError(f"{resolved.manifest_path}: unreadable cache manifest ({e})") from e
    files = {entry["path"]: entry for entry in data.get("files", [])}
    return CacheManifest(snapshot_dir=resolved.data_dir, revision=str(data.get("revision", "")), files=files,
                         digest_scheme=str(data.get("digest_scheme", layout.DIGEST_SCHEME)),
                         chunk_size=int(data.get("chunk_size", layout.CHUNK_SIZE)))


def verify_files(manifest: CacheManifest, paths: Iterable[Path], *, digest: bool) -> None:
    """Check each file's size (and digest, under the manifest's scheme, if ``digest``) against ``manifest``."""
    from agent.store import layout

    for path in paths:
        rel = Path(os.path.realpath(path)).relative_to(manifest.snapshot_dir).as_posix()
        entry = manifest.files.get(rel)
        if entry is None:
            raise CorruptModelError(f"{path}: not listed in the cache manifest of revision {manifest.revision}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CorruptModelError(f"{path}: {size} bytes on disk but the cache manifest says {entry['size']}")
        if digest:
            actual = layout.hash_file(path, scheme=manifest.digest_scheme, chunk_size=manifest.chunk_size)
            if actual != entry["xxh3_128"]:
                raise CorruptModelError(f"{path}: digest {actual} but the cache manifest says {entry['xxh3_128']}")


# --------------------------------------------------------------------------------------------------- strategies


class LoadStrategy(Protocol):
    """Turns checked weight files into tensors on ``device``."""

    name: str

    def load(self, files: ModelFiles, device: torch.device) -> dict[str, torch.Tensor]: ...


_MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python's mmap module
_POPULATE_CHUNK = 64 * 1024 * 1024


class _Libc:
    """``madvise`` through ctypes: unlike ``mmap.madvise`` it releases the GIL, so probes answer while we fault."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.madvise = lib.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.madvise.restype = ctypes.c_int


class MmapStrategy:
    """Zero-copy: tensors are views of private file mappings, faulted in before we call the model loaded."""

    name = "mmap"

    def __init__(self, *, threads: int = 4) -> None:
        self._threads = threads
        self._libc: _Libc | None
        try:
            self._libc = _Libc()
        except (OSError, AttributeError):
            self._libc = None
        self._populate_works = self._libc is not None

    def load(self, files: ModelFiles, device: torch.device) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        regions: list[tuple[torch.Tensor, int, int]] = []
        for wf in files.weights:
            flat = self._map(wf)
            if flat is None:
                for spec in wf.tensors.values():
                    state[spec.name] = torch.empty(spec.shape, dtype=spec.torch_dtype)
                continue
            regions.extend(
                (flat, off, min(_POPULATE_CHUNK, wf.size - off)) for off in range(0, wf.size, _POPULATE_CHUNK)
            )
            for spec in wf.tensors.values():
                state[spec.name] = _view(flat, wf.data_offset + spec.start, spec)
        # Fault every page in now, several chunks at a time (the disk likes a queue), so "loaded" means resident.
        with ThreadPoolExecutor(self._threads, thread_name_prefix="populate") as pool:
            list(pool.map(lambda r: self._populate(*r), regions))
        if device.type != "cpu":
            state = {name: t.to(device) for name, t in state.items()}
        return state

    @staticmethod
    def _map(wf: SafetensorsFile) -> torch.Tensor | None:
        if wf.size == 0 or wf.data_len == 0:
            return None
        with open(wf.path, "rb") as f:
            # ACCESS_COPY (MAP_PRIVATE): a writable view without ever writing to the read-only cache, and no
            # "non-writable buffer" warning from torch. Pages stay shared with the page cache until written.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            try:
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            except OSError:
                pass
        # The tensor keeps ``mapped`` alive (torch.frombuffer holds the buffer) for as long as any view exists.
        return torch.frombuffer(mapped, dtype=torch.uint8)

    def _populate(self, flat: torch.Tensor, offset: int, length: int) -> None:
        if self._populate_works and self._libc is not None:
            rc = self._libc.madvise(ctypes.c_void_p(flat.data_ptr() + offset), length, _MADV_POPULATE_READ)
            if rc == 0:
                return
            self._populate_works = False  # older kernel: touch the pages instead (torch releases the GIL)
            log.debug("MADV_POPULATE_READ unavailable (errno %d); touching pages", ctypes.get_errno())
        flat[offset : offset + length : 4096].sum()


def _view(flat: torch.Tensor, byte_offset: int, spec: TensorSpec) -> torch.Tensor:
    """A tensor of ``spec``'s dtype and shape over ``flat[byte_offset:...]``, without copying when aligned."""
    nbytes = spec.end - spec.start
    if nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.torch_dtype, device=flat.device)
    raw = flat[byte_offset : byte_offset + nbytes]
    dtype = spec.torch_dtype
    if (flat.data_ptr() + byte_offset) % dtype.itemsize:
        raw = raw.clone()  # misaligned (legal in safetensors, rare in practice): one small copy
    return raw.view(dtype).view(spec.shape)


class PipelinedStrategy:
    """Disk → pinned host ring → device, overlapped: ``preadv`` fills one buffer while another is copied.

    On CUDA the copies are asynchronous on a side stream and each buffer is reused only after its copy's event
    completed. On CPU the same loop runs with plain buffers and synchronous copies.
    """

    name = "pipelined"

    def __init__(self, *, chunk_bytes: int = 64 * 1024 * 1024, buffers: int = 2) -> None:
        self._chunk = chunk_bytes
        self._buffers = buffers

    def load(self, files: ModelFiles, device: torch.device) -> dict[str, torch.Tensor]:
        cuda = device.type == "cuda"
        chunk = min(self._chunk, max((wf.data_len for wf in files.weights), default=1) or 1)
        ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(self._buffers)]
        views = [b.numpy().data for b in ring]
        events: list[Any] = [None] * self._buffers
        stream = torch.cuda.Stream(device=device) if cuda else None  # type: ignore[no-untyped-call]
        state: dict[str, torch.Tensor] = {}
        slot = 0
        for wf in files.weights:
            dest = torch.empty(wf.data_len, dtype=torch.uint8, device=device)
            with open(wf.path, "rb", buffering=0) as f:
                fd = f.fileno()
                _advise_sequential(fd, wf.size)
                for offset in range(0, wf.data_len, chunk):
                    n = min(chunk, wf.data_len - offset)
                    if events[slot] is not None:
                        events[slot].synchronize()  # the buffer's previous copy must be done before we overwrite it
                    _pread_exact(fd, views[slot][:n], wf.data_offset + offset, wf.path)
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            dest[offset : offset + n].copy_(ring[slot][:n], non_blocking=True)
                            events[slot] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                            events[slot].record(stream)
                    else:
                        dest[offset : offset + n].copy_(ring[slot][:n])
                    slot = (slot + 1) % self._buffers
            for spec in wf.tensors.values():
                state[spec.name] = _view(dest, spec.start, spec)
        if stream is not None:
            stream.synchronize()
        return state


def _advise_sequential(fd: int, size: int) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CorruptModelError(f"{path}: ended at byte {offset + done} while reading (truncated since checked?)")
        done += n


STRATEGIES: dict[str, Callable[[], LoadStrategy]] = {"mmap": MmapStrategy, "pipelined": PipelinedStrategy}


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is a load error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("WEIGHTCACHE_DEVICE=cuda but torch sees no GPU")
    return torch.device(name)


def choose_strategy(name: str, device: torch.device) -> LoadStrategy:
    if name == "auto":
        name = "pipelined" if device.type == "cuda" else "mmap"
    return STRATEGIES[name]()


# --------------------------------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class LoadedModel:
    """Everything a handler needs, all checked: tensors on ``device``, the config, and how long it took."""

    files: ModelFiles
    state_dict: dict[str, torch.Tensor]
    device: torch.device
    strategy: str
    verified: str  # what was checked against the manifest: "digest", "size", or "headers"
    seconds: float


def load_model(
    model_path: Path,
    *,
    root: Path,
    device: torch.device,
    strategy: str = "auto",
    verify: str = "size",
) -> LoadedModel:
    """Discover, check and load the model at ``model_path``; blocking (run it in a thread)."""
    start = time.perf_counter()
    # Resolve the published pointer once: every file comes from this one immutable build, even if the agent
    # publishes a newer revision while we load.
    model_path = Path(os.path.realpath(model_path))
    files = discover(model_path)
    verified = "headers"
    if verify != "none":
        manifest = find_manifest(root, model_path)
        if manifest is not None:
            verify_files(manifest, [w.path for w in files.weights] + files.extra_files, digest=verify == "digest")
            verified = verify
    loader = choose_strategy(strategy, device)
    try:
        state = loader.load(files, device)
    except (OSError, RuntimeError) as e:
        raise ModelLoadError(f"loading {model_path} with the {loader.name} strategy failed: {e}") from e
    seconds = time.perf_counter() - start
    log.info(
        "loaded %d tensors (%.1f MiB, %d file(s), %s) onto %s with %s in %.2f s; checked: %s",
        len(state), files.total_bytes / 2**20, len(files.weights), files.kind, device, loader.name, seconds, verified,
    )
    return LoadedModel(
        files=files, state_dict=state, device=device, strategy=loader.name, verified=verified, seconds=seconds,
    )


__all__ = [
    "DTYPES", "FORMATS", "STRATEGIES", "CacheManifest", "LoadedModel", "ModelFiles", "SafetensorsFile",
    "TensorSpec", "choose_strategy", "discover", "find_manifest", "load_model", "read_safetensors_header",
    "resolve_device", "verify_files",
]
