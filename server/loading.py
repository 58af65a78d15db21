"""Loading model weights from the node cache: find them, check them, map or copy them onto the device.

What it does, in order (all of it blocking: callers run it in a worker thread so probes stay responsive):

1. **Discover** the weight files through the registry of formats in :mod:`server.formats`: a sharded safetensors
   model (``model.safetensors.index.json``) or single safetensors files.
2. **Check** every file before a single tensor is built: the safetensors header parses, every tensor's dtype is
   known, its byte range matches its shape and lies inside the file; and, when the model lives in the node cache,
   each file's size (always) and xxh3-128 digest (``verify="digest"``) match the cache manifest.
3. **Load** with one of two strategies (``STRATEGIES``):
   - ``mmap`` (CPU): zero-copy. Each file is mapped privately and tensors are ``torch.frombuffer`` views into it;
     the pages are then faulted in with ``MADV_POPULATE_READ`` in parallel chunks, so that "loaded" honestly
     means "resident" and the first inference does not pay for the disk.
   - ``pipelined`` (CUDA): several threads ``preadv`` chunks of several files at once into their own pinned host
     buffers while their previous chunks are copied to the device asynchronously on their own streams: disk reads
     and host→device copies overlap, across files.
     On CPU the same code runs with ordinary buffers (that is how the tests exercise it).

It never writes to the cache (the root is mounted read-only) and never returns a partially loaded model: any
problem is a ``CorruptModelError`` / ``ModelLoadError`` and nothing is served.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from server.errors import CorruptModelError, ModelLoadError
from server.formats import ModelFiles, SafetensorsFile, TensorSpec, discover

log = logging.getLogger(__name__)

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
    """Disk → pinned host buffers → device, several files at once, reads and copies overlapped.

    The weights are cut into chunks, interleaved across files, and ``workers`` threads take them in turn: each
    thread ``preadv``s a chunk into one of its own pinned buffers while its previous chunk is still being copied to
    the device on the thread's own stream. So several files are read at once (the disk gets a queue, as in the
    mmap strategy) and the host→device copies of one thread overlap the reads of all. A buffer is reused only
    after the event of its previous copy completed. Every device buffer is allocated before the first read, so a
    model that does not fit fails at once. On CPU the same code runs with plain buffers and synchronous copies
    (that is how the tests exercise it).
    """

    name = "pipelined"

    def __init__(self, *, chunk_bytes: int = 32 * 1024 * 1024, buffers: int = 2, workers: int = 4) -> None:
        self._chunk = chunk_bytes
        self._buffers = buffers
        self._workers = workers

    def load(self, files: ModelFiles, device: torch.device) -> dict[str, torch.Tensor]:
        weights = list(files.weights)
        dests = [torch.empty(wf.data_len, dtype=torch.uint8, device=device) for wf in weights]
        chunk = min(self._chunk, max((wf.data_len for wf in weights), default=1) or 1)
        per_file = [[(i, off, min(chunk, wf.data_len - off)) for off in range(0, wf.data_len, chunk)]
                    for i, wf in enumerate(weights)]
        # Round-robin over files: the first chunks of several files are in flight at once.
        tasks = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]
        fds: list[int] = []
        try:
            for wf in weights:
                fds.append(os.open(wf.path, os.O_RDONLY))
                _advise_sequential(fds[-1], wf.size)
            queue = iter(tasks)
            lock = threading.Lock()
            failed = threading.Event()

            def take() -> tuple[int, int, int] | None:
                with lock:
                    return None if failed.is_set() else next(queue, None)

            def work() -> None:
                try:
                    self._copy_chunks(take, weights, fds, dests, chunk, device)
                except BaseException:
                    failed.set()  # the other workers stop at their next chunk: the load fails as a whole
                    raise

            workers = max(1, min(self._workers, len(tasks)))
            with ThreadPoolExecutor(workers, thread_name_prefix="load") as pool:
                for future in [pool.submit(work) for _ in range(workers)]:
                    future.result()
        finally:
            for fd in fds:
                os.close(fd)
            if device.type == "cuda":
                _release_pinned_memory()
        state: dict[str, torch.Tensor] = {}
        for wf, dest in zip(weights, dests):
            for spec in wf.tensors.values():
                state[spec.name] = _view(dest, spec.start, spec)
        return state

    def _copy_chunks(
        self,
        take: Callable[[], tuple[int, int, int] | None],
        weights: list[SafetensorsFile],
        fds: list[int],
        dests: list[torch.Tensor],
        chunk: int,
        device: torch.device,
    ) -> None:
        """One worker: read chunks into its own ring of buffers, copy each to its place on the device."""
        cuda = device.type == "cuda"
        ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(self._buffers)]
        views = [b.numpy().data for b in ring]
        events: list[Any] = [None] * self._buffers
        stream = torch.cuda.Stream(device=device) if cuda else None  # type: ignore[no-untyped-call]
        slot = 0
        while (task := take()) is not None:
            i, offset, n = task
            if events[slot] is not None:
                events[slot].synchronize()  # the buffer's previous copy must be done before we overwrite it
            _pread_exact(fds[i], views[slot][:n], weights[i].data_offset + offset, weights[i].path)
            if stream is not None:
                with torch.cuda.stream(stream):
                    dests[i][offset : offset + n].copy_(ring[slot][:n], non_blocking=True)
                    events[slot] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    events[slot].record(stream)
            else:
                dests[i][offset : offset + n].copy_(ring[slot][:n])
            slot = (slot + 1) % self._buffers
        if stream is not None:
            stream.synchronize()


def _release_pinned_memory() -> None:
    """Hand the pinned buffers (256 MiB by default) back to the system once every copy is done, instead of leaving
    them in torch's host cache for the life of the server: the public call where torch has it (2.13), else the
    one torch 2.11 has (checked on an H200: 8 of 8 pinned blocks freed)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


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


def prepare_device(name: str) -> torch.device:
    """``resolve_device`` and, for a GPU, create its context now: it takes a second or more on a big GPU, and the
    server runs this while it still waits for the model, so the load does not pay for it."""
    device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.init()  # type: ignore[no-untyped-call]
        torch.empty(1, device=device)  # the context of *this* device, not just the runtime
    return device


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
    "STRATEGIES", "CacheManifest", "LoadedModel", "choose_strategy", "find_manifest", "load_model", "prepare_device",
    "resolve_device",
    "verify_files",
]
