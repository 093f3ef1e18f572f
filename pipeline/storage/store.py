"""The Zarr store: one v3 group per stage output, fingerprinted, locked, resumable by blocks.

Contract (see DESIGN.md):
- the group's ``fingerprint`` attribute hashes everything that determines its content; opening
  an existing output with a different fingerprint is an error unless the caller asks to replace it;
- work is split in blocks aligned with the shards of the per-video arrays; a worker writes a
  block's data (its own shards, one writer each), then the coordinating process records the
  block's statuses and, last, its entry in ``block_done`` (whole-column bookkeeping that only the
  coordinator writes; the marker never depends on whether zarr skipped a fill chunk);
- one writer process per store, enforced with ``fcntl.flock`` on ``.<store>.lock`` beside the
  store (readers hold it shared): the lock dies with its process, so a killed run never blocks its
  own resume, and it exists before the store does.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import UnstableSpecificationWarning

from pipeline.core.cachefs import as_path, is_remote, remove_tree, walk
from pipeline.core.errors import DamagedStore, FingerprintMismatch, PipelineError, StoreLocked, read_error

# Variable-length strings and bytes are not yet frozen in the Zarr v3 spec; zarr-python reads
# and writes them fine and we pin zarr's minor version, so the warning is noise for our users.
warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
# Every chunk a writer touches is written, even when it equals the fill value (zarr skips those by default):
# a missing chunk file then always means lost data, which `status` and every reader can see from a listing.
zarr.config.set({"array.write_empty_chunks": True})

# 2: bookkeeping columns in whole-column chunks, locks beside the stores. 3: the fingerprint holds the settings
# only (the rows are keyed by video id and live from snapshot to snapshot: ``added_in``, ``dropped_in``), blocks
# and column chunks no longer depend on the number of rows, so that a store can grow.
FORMAT_VERSION = 3
DONE_ARRAY = "block_done"
DIGEST_ARRAY = "block_digest"  # per block: sha256 of its per-video arrays as the worker wrote them
# Bookkeeping columns (status, reason, block_done) are written by the one coordinating process in
# chunks of this many rows, so that a summary of 246,000 videos reads a handful of chunks.
COLUMN_CHUNK = 65536
# VOID: a row that pads a block which was short when rows were appended after it (new rows start at a block
# boundary, so that a finished block is never written again). Never live, never read, never counted.
PENDING, OK, FAILED, VOID = 0, 1, 2, 3
# A block holds at most this many videos: blocks are shards, and a shard's index grows with its rows.
MAX_BLOCK_ROWS = 4096


def fingerprint(record: dict[str, Any]) -> str:
    """sha256 of a JSON-able record (sorted keys), with the store format version mixed in."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **record}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock of the output at ``path``: a file beside it, never inside it.

    Outside, because creating a store empties its folder (the lock must exist before the store
    and survive its creation), and because a DVC output's hash must depend on its content only.
    """
    path = as_path(path)
    return path.parent / f".{path.name}.{'lease' if is_remote(path) else 'lock'}"


# Descriptors of the locks this process holds. A forked child (a DataLoader worker, a multiprocessing fork)
# inherits them, and an flock lives until every descriptor of it is closed: a child would keep a killed
# writer's lock alive. Children close their copies at once, which leaves the parent's lock as it is.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _release(fd: int) -> None:
    _HELD_LOCKS.discard(fd)
    os.close(fd)  # closing releases the flock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(fd: int, mode: int) -> bool:
    """Take the flock ``mode`` on ``fd`` without waiting, except for a lock whose writer is gone: a child it
    forked may still hold the descriptor for the moment before that child closes it (the fork hook above runs
    when the child is first scheduled), so such a lock is retried for a few seconds."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if not holder.isdigit() or _pid_alive(int(holder)):
        return False
    deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


DEAD_HOLDER_WAIT_S = 5.0


def _holder_text(fd: int) -> str:
    """Who holds the lock, as written in it: the writer's pid (a reader writes nothing)."""
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if not holder:
        return "read by another process"
    if holder.isdigit() and not _pid_alive(int(holder)):
        # its owner is gone but a process it started still holds the descriptor (not one of ours: ours close it)
        return (f"held by a child of process {holder}, which has exited; stop that child process "
                f"(`fuser {{lock}}` lists it)")
    return f"written by another process (pid {holder})"


def _open_lock(path: Path, exclusive: bool) -> int | None:
    """A descriptor of the lock file at ``path``, never following a symlink planted there.

    ``None`` for a reader of a read-only cache (nobody can write there either).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PipelineError(f"{path} is a symbolic link; remove it (a lock file is never followed)") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            if not exclusive:
                return None
            raise PipelineError(f"cannot write under {path.parent}: {os.strerror(e.errno)} "
                                "(a read-only cache can be read, not written)") from None
        if e.errno == errno.ENOSPC:
            raise PipelineError(f"no space left on the device holding {path.parent}") from None
        raise PipelineError(f"cannot create the lock {path}: {os.strerror(e.errno or 0)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PipelineError(f"{path} is not a regular file; remove it")
    return fd


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of the output at ``path`` (exclusive; readers hold it shared).

    On object storage (a URL): a lease object, see :func:`remote_lease`.
    """
    if is_remote(path):
        with remote_lease(as_path(path)):
            yield
        return
    lp = lock_path(path)
    fd = _open_lock(lp, exclusive=True)
    assert fd is not None
    _HELD_LOCKS.add(fd)
    try:
        if not _acquire(fd, fcntl.LOCK_EX):
            doing = _holder_text(fd).replace("{lock}", str(lp))
            raise StoreLocked(f"{path} is being {doing}; wait for it to finish or stop it")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            try:
                os.ftruncate(fd, 0)  # a reader that finds the lock taken knows it is not a writer
            except OSError:
                pass
    finally:
        _release(fd)


# A remote writer's lease lasts this long unless renewed (every third of it while the writer
# runs): a killed writer's store can be taken over after at most this many seconds.
LEASE_SECONDS = float(os.environ.get("PIPELINE_LEASE_SECONDS", "120"))


@contextmanager
def remote_lease(path: Path) -> Iterator[None]:
    """The one-writer rule on object storage: a lease object beside the store, created only if absent.

    Creation uses the storage's conditional create (S3 ``If-None-Match: *``, GCS generation 0, fsspec
    ``mode="xb"``). A lease past its expiry (its writer was killed) is taken over. A storage that
    cannot create conditionally is refused: one writer could not be guaranteed there.
    """
    lease = lock_path(path)
    fs, key = lease.fs, lease.path
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"

    def body() -> bytes:
        return json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()

    def create() -> None:
        with fs.open(key, "xb") as f:
            f.write(body())

    def holder() -> dict:
        try:
            return json.loads(fs.cat_file(key))
        except (FileNotFoundError, ValueError):
            return {}

    try:
        try:
            create()
        except FileExistsError:
            held = holder()
            if held.get("expires", 0) > time.time():
                raise StoreLocked(
                    f"{path} is being written by another process ({held.get('owner', '?')}); its lease expires "
                    f"{max(0, held['expires'] - time.time()):.0f} s after its last renewal (PIPELINE_LEASE_SECONDS)"
                ) from None
            fs.rm_file(key)  # expired: its writer was killed
            try:
                create()
            except FileExistsError:
                raise StoreLocked(f"{path} was just taken over by another process") from None
    except (NotImplementedError, ValueError) as e:
        raise PipelineError(f"{path}: this storage cannot create an object only if it is absent ({e}), so one "
                            "writer per store cannot be guaranteed there; use S3, GCS or a local or shared disk"
                            ) from None
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                if holder().get("owner") == owner:
                    fs.pipe_file(key, body())
            except Exception:  # noqa: BLE001 - a missed renewal only shortens the lease
                pass

    renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=10)
        try:
            if holder().get("owner") == owner:
                fs.rm_file(key)
        except FileNotFoundError:
            pass


@contextmanager
def reader_lock(*paths: str | os.PathLike) -> Iterator[None]:
    """Hold a shared lock on each input output: no writer can rebuild it while we read it."""
    fds = []
    try:
        for path in paths:
            if is_remote(path):
                continue  # object storage has no shared locks; consumers re-check fingerprints at every use
            fd = _open_lock(lock_path(path), exclusive=False)
            if fd is None:
                continue
            fds.append(fd)
            _HELD_LOCKS.add(fd)
            if not _acquire(fd, fcntl.LOCK_SH):
                doing = _holder_text(fd).replace("{lock}", str(lock_path(path)))
                raise StoreLocked(f"{path} is being {doing}; wait for it to finish, then re-run")
        yield
    finally:
        for fd in fds:
            _release(fd)


def open_output(path: str | os.PathLike, fp: str, params: dict[str, Any], *, replace_mismatched: bool,
                init: Callable[[zarr.Group], None], renewable: tuple[str, ...] = ()) -> zarr.Group:
    """Open the output at ``path`` for writing, creating it with ``init`` when needed.

    A store whose fingerprint matches is resumed (an interrupted append or drop is undone first, see
    :func:`settle`). One made with other parameters is an error, or is deleted and rebuilt with
    ``replace_mismatched``; so is one made by an older store format. ``renewable``: prefixes of ``params``
    keys that name the snapshots of its inputs (a head's): an output that differs in those only is of an
    older snapshot, and is rebuilt without asking. A store whose creation was interrupted (no fingerprint
    yet) holds no finished work and is rebuilt. Call under :func:`writer_lock`.
    """
    path = as_path(path)
    finish_swap(path)  # a compaction killed between its two renames
    if (path / "zarr.json").exists():
        try:
            group = open_group(path, mode="r+")
        except DamagedStore as e:
            if not replace_mismatched:
                raise DamagedStore(f"{e}; re-run with --replace-mismatched to rebuild it") from None
            group = None
        old = group.attrs.get("fingerprint") if group is not None else None
        if old == fp:
            settle(group)  # an append or drop killed half-way: back to the last snapshot, then done again
            check_bookkeeping(group, path)
            return group
        made_by = int(group.attrs.get("format_version", 1)) if group is not None else FORMAT_VERSION
        if old is not None and made_by < FORMAT_VERSION and not replace_mismatched:
            raise FingerprintMismatch(
                f"{path} was made by an older version of the pipeline (store format {made_by}, now "
                f"{FORMAT_VERSION}, which can grow); rebuild it with --replace-mismatched")
        changed = _changed_keys(group.attrs.get("params", {}), params) if old is not None else []
        renew = bool(changed) and made_by == FORMAT_VERSION and all(k.startswith(renewable) for k in changed)
        if old is not None and not replace_mismatched and not renew:
            raise FingerprintMismatch(
                f"{path} was made with different parameters or inputs"
                + (f" (changed: {', '.join(changed)})" if changed else "")
                + "; re-run with --replace-mismatched to rebuild it, or use another --cache")
        remove_tree(path)  # the lock lives beside the store and is untouched
    group = zarr.open_group(str(path), mode="w")
    init(group)
    # Written last: a store without a fingerprint is an unfinished creation. ``arrays``: what a reader must
    # find (an array whose metadata was deleted is damage, not an absent feature); ``all_chunks``: every chunk
    # is written, so a missing chunk file is always damage (stores made before could skip fill chunks).
    group.attrs.update({"params": params, "format_version": FORMAT_VERSION, "arrays": sorted(group.array_keys()),
                        "all_chunks": True, "fingerprint": fp})
    return group


def open_existing(path: str | os.PathLike, what: str) -> zarr.Group:
    """Open a finished-or-resumable output for reading, with a one-line error when absent."""
    path = as_path(path)
    if not (path / "zarr.json").exists():
        raise PipelineError(f"no {what} at {path}: run the stage that makes it first")
    group = open_group(path, mode="r")
    if "fingerprint" not in group.attrs:
        raise PipelineError(f"{what} at {path} was never fully created: re-run its stage")
    if group.attrs.get(CHANGE):
        raise PipelineError(f"{what} at {path} was being changed (videos added or dropped) when its writer "
                            "stopped: re-run its stage to finish the change")
    problems = cheap_damage(group)
    if problems:
        raise DamagedStore(f"{what} at {path} is damaged ({problems[0]}): run `pipeline verify --repair`, then "
                           "re-run its stage")
    check_bookkeeping(group, path)
    return group


def open_group(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """``zarr.open_group``, with unreadable metadata (a truncated or edited zarr.json) as :class:`DamagedStore`."""
    try:
        return zarr.open_group(str(path), mode=mode)
    except (ValueError, TypeError, KeyError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (None, errno.EINVAL):
            raise
        raise DamagedStore(f"{path} has unreadable metadata ({type(e).__name__})") from None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


# ---- arrays ---------------------------------------------------------------------------------

MAX_BLOCK_BYTES = 2 << 30  # a worker holds one block in memory


# Named dimensions (zarr v3 ``dimension_names``), so that ``xarray.open_zarr(store)`` opens every output.
DIMENSIONS = {
    "frames": ("video", "frame", "y", "x", "rgb"), "frame_index": ("video", "frame"),
    "timestamp": ("video", "frame"), "features": ("video", "frame", "feature"), "targets": ("video", "class"),
    "head": ("class", "feature"), "embeddings": ("class", "feature"), DONE_ARRAY: ("block",),
    "sample_video_id": ("sample",), DIGEST_ARRAY: ("block",),
}


def dims_of(name: str, ndim: int) -> tuple[str, ...]:
    """The dimension names of array ``name`` with ``ndim`` dimensions (per-video columns: ``video``)."""
    known = DIMENSIONS.get(name, ("video",))
    return known[:ndim] if len(known) >= ndim else (*known, *(f"{name}_{i}" for i in range(len(known), ndim)))


def checksummed(compress: bool = True) -> list[Any]:
    """Every array's codecs end with a CRC-32C of the chunk: damaged bytes fail loudly on read."""
    return [ZstdCodec(level=3), Crc32cCodec()] if compress else [Crc32cCodec()]


def create_small(group: zarr.Group, name: str, data: np.ndarray) -> zarr.Array:
    """A small array written whole at creation, in one checksummed chunk (heads, label embeddings).

    The sha256 of its values is kept in its attributes: a deleted chunk (read back as zeros) is
    caught when the output is opened.
    """
    arr = group.create_array(name, data=data, chunks=data.shape, compressors=checksummed(),
                             dimension_names=dims_of(name, data.ndim))
    arr.attrs["sha256"] = values_sha256(np.asarray(data))
    return arr


def values_sha256(values: np.ndarray) -> str:
    """sha256 of an array's values (strings as UTF-8 text, numbers as little-endian bytes)."""
    h = hashlib.sha256()
    if values.dtype.kind in "OUT":
        for v in values.reshape(-1).tolist():
            h.update(str(v).encode() + b"\0")
    else:
        h.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def bounded_block(block: int, row_bytes: int = 0) -> int:
    """A block size no larger than :data:`MAX_BLOCK_ROWS` videos, nor than 2 GiB of rows in memory.

    Not bounded by the rows a store holds (format 2 was): a store keeps its block size when it grows, so the
    block size, part of the fingerprint, must not change with the number of videos."""
    cap = max(1, MAX_BLOCK_BYTES // row_bytes) if row_bytes > 0 else MAX_BLOCK_ROWS
    return max(1, min(int(block), MAX_BLOCK_ROWS, cap))


def create_per_video(group: zarr.Group, name: str, n: int, block: int, inner: tuple[int, ...], dtype: Any,
                     fill_value: Any = 0, compress: bool = True, chunk_per_video: bool = True) -> zarr.Array:
    """A per-video data array [n, *inner], sharded by blocks of ``block`` videos, one chunk per video.

    Shards are the unit of work and of writing (one writer each); a chunk per video keeps random
    reads (training loaders) cheap. Small arrays, and arrays read whole (``chunk_per_video=False``:
    features), use plain chunks of one block.
    """
    block = bounded_block(block)
    shape = (n, *inner)
    kwargs: dict[str, Any] = {"compressors": checksummed(compress)}
    if chunk_per_video and inner and int(np.prod(inner)) * np.dtype(dtype).itemsize >= 4096:
        kwargs.update(chunks=(1, *inner), shards=(block, *inner))
    else:
        kwargs.update(chunks=(block, *inner))
    return group.create_array(name, shape=shape, dtype=dtype, fill_value=fill_value,
                              dimension_names=dims_of(name, len(shape)), **kwargs)


def create_column(group: zarr.Group, name: str, values: np.ndarray, digest: bool = True) -> zarr.Array:
    """A per-video column written whole (ids, paths, labels), with the sha256 of its values.

    ``digest=False`` for bookkeeping columns, which the ledger rewrites. Chunks of :data:`COLUMN_CHUNK` rows
    whatever the store's size: a store that grows from 2 videos to 246,000 keeps a few chunks per column.
    """
    values = np.asarray(values)
    dtype = str if values.dtype.kind in "UTO" else values.dtype
    chunk = COLUMN_CHUNK
    arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=(chunk, *values.shape[1:]),
                             fill_value="" if dtype is str else 0, compressors=checksummed(),
                             dimension_names=dims_of(name, values.ndim))
    if len(values):
        # via a list: numpy's StringDType (zarr's string reads) does not cast to fixed-width str
        arr[...] = np.array(values.tolist(), dtype=np.str_) if dtype is str else values
    if digest:
        arr.attrs["sha256"] = values_sha256(values)
    return arr


def create_bookkeeping(group: zarr.Group, n: int, block: int, failed: np.ndarray | None = None,
                       reasons: np.ndarray | None = None) -> None:
    """``status`` int8 [n], ``reason`` str [n] and ``block_done`` uint8 [blocks], as whole columns.

    Rows known to fail before any work (``failed``: a bool mask, e.g. files missing from the
    dataset) are recorded here in one write each, and blocks made only of them are done at once.
    Only the coordinating process writes these columns afterwards (:class:`Ledger`), so large
    chunks never see two writers.
    """
    block = bounded_block(block)
    n_blocks = (n + block - 1) // block
    status = np.full(n, PENDING, np.int8)
    reason = np.full(n, "", dtype=object)
    if failed is not None and failed.any():
        status[failed] = FAILED
        reason[failed] = reasons[failed] if reasons is not None else "failed"
    create_column(group, "status", status, digest=False)
    create_column(group, "reason", reason.astype(str) if n else np.array([], dtype=str), digest=False)
    done = np.zeros(n_blocks, np.uint8)
    if n and failed is not None:
        padded = np.ones(n_blocks * block, bool)
        padded[:n] = failed
        done[:] = padded.reshape(n_blocks, block).all(axis=1)
    create_column(group, DONE_ARRAY, done, digest=False)
    create_column(group, DIGEST_ARRAY, np.full(n_blocks, "", dtype=object).astype(str), digest=False)


@dataclass
class BlockResult:
    """A block a worker has written: its rows' status and failure reasons, for the coordinator to record."""

    block: int
    status: np.ndarray  # int8 [m]
    reasons: np.ndarray  # str [m], "" for ok rows
    digest: str = ""  # sha256 of the block's per-video arrays as written (:func:`block_digest`)
    # other bookkeeping columns of the block's rows, recorded with the statuses (a frame store's file hashes)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.status.size)


class Ledger:
    """Records finished blocks: their rows' status and reason, then their done markers.

    Workers write a block's data; the coordinating process (the lock holder) records the block
    here. The first result is written at once, the next ones buffered and written in whole-chunk
    updates every ``every_s`` seconds and on close: markers strictly after statuses, so a killed run
    at worst redoes the blocks of the last seconds.
    """

    def __init__(self, group: zarr.Group, every_s: float = 2.0) -> None:
        self.group, self.every_s = group, every_s
        self._buffer: list[BlockResult] = []
        self._last = -float("inf")  # the first finished block is recorded at once

    def record(self, result: BlockResult) -> None:
        self._buffer.append(result)
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buffer:
            return
        self._buffer.sort(key=lambda r: r.block)
        blocks = np.array([r.block for r in self._buffer])
        rows = block_rows(self.group, blocks)
        status = np.concatenate([np.asarray(r.status, np.int8) for r in self._buffer])
        reasons = np.concatenate([np.asarray(r.reasons, dtype=object) for r in self._buffer]).astype(str)
        for name in self._buffer[0].columns:
            values = np.concatenate([np.asarray(r.columns[name]) for r in self._buffer])
            self.group[name].oindex[rows] = np.array(values.tolist(), np.str_) if values.dtype.kind in "OUT" else values
        self.group["reason"].oindex[rows] = reasons
        self.group["status"].oindex[rows] = status
        if DIGEST_ARRAY in self.group:
            self.group[DIGEST_ARRAY].oindex[blocks] = np.array([r.digest for r in self._buffer], dtype=np.str_)
        self.group[DONE_ARRAY].oindex[blocks] = 1
        self._buffer.clear()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()  # finished blocks are kept even when the run is interrupted


def pending_blocks(group: zarr.Group) -> list[int]:
    done = group[DONE_ARRAY][:]
    return np.flatnonzero(done[:n_blocks_of(group)] == 0).tolist()


def n_blocks_of(group: zarr.Group) -> int:
    n, block = int(group.attrs["n"]), int(group.attrs["block_size"])
    return (n + block - 1) // block


def rows_in(group: zarr.Group, blocks: list[int]) -> int:
    """How many videos the given blocks hold (the last block may be short)."""
    n, size = int(group.attrs["n"]), int(group.attrs["block_size"])
    b = np.asarray(blocks, np.int64)
    return int((np.minimum(n, (b + 1) * size) - b * size).sum()) if b.size else 0


def block_rows(group: zarr.Group, blocks: np.ndarray) -> np.ndarray:
    """The row indices of the given blocks, in the blocks' order."""
    return np.concatenate([np.arange(s.start, s.stop) for s in (block_slice(group, int(b)) for b in blocks)])


def block_slice(group: zarr.Group, block: int) -> slice:
    n, size = int(group.attrs["n"]), int(group.attrs["block_size"])
    return slice(block * size, min(n, (block + 1) * size))


def as_text(values: np.ndarray) -> np.ndarray:
    """A string column as read from zarr (numpy's StringDType) as an object array of ``str``."""
    return np.array(values.tolist(), dtype=object)


def failure_table(group: zarr.Group, rows: np.ndarray) -> list[dict[str, str]]:
    """``video_id``, ``path`` and ``reason`` of the given rows, read as whole column ranges."""
    if not rows.size:
        return []
    lo, hi = int(rows.min()), int(rows.max()) + 1
    cols = {name: group[name][lo:hi] for name in ("video_id", "path", "reason")}
    return [{"video_id": str(cols["video_id"][i - lo]), "path": str(cols["path"][i - lo]),
             "reason": str(cols["reason"][i - lo])} for i in rows.tolist()]


def summarize(group: zarr.Group, path: str | os.PathLike, max_failures: int | None = 20) -> dict[str, Any]:
    """Counts and failures of a per-video store (any stage with ``status``/``reason`` arrays), and the damage
    seen cheaply (``damaged``: why, or None; see :func:`cheap_damage`).

    ``failures``: the first ``max_failures`` failed videos (None: all of them); ``failure_reasons``: how many
    videos failed for each reason (its text up to the first ':' or '('), so that a million missing files
    summarise in a few lines. Outputs that are not per video (label embeddings, heads) count their rows.
    """
    attrs = group.attrs
    if attrs.get(CHANGE):  # its arrays and its attributes disagree until the change is finished
        return {"stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split", "-"),
                "path": str(path), "total": int(attrs.get("n", 0)), "ok": 0, "failed": 0, "pending": 0,
                "complete": False, "fingerprint": attrs.get("fingerprint"), "failures": [], "failure_reasons": {},
                "damaged": None, "interrupted": "an append or drop was interrupted: re-run its stage to finish it",
                **snapshot_counts(group)}
    problems = cheap_damage(group)
    if "status" not in group or problems:
        rows = int(attrs.get("n", attrs.get("rows", len(attrs.get("class_names", [])))))
        entry = {"stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split", "-"),
                 "path": str(path), "total": rows, "ok": 0 if problems else rows, "failed": 0, "pending": 0,
                 "complete": not problems, "fingerprint": attrs.get("fingerprint"), "failures": [],
                 "failure_reasons": {}, "damaged": "; ".join(problems[:3]) if problems else None}
        return entry
    status = group["status"][:]
    live = live_mask(group)
    failed_rows = np.flatnonzero((status == FAILED) & live)
    shown = failed_rows if max_failures is None else failed_rows[:max_failures]
    bad = inconsistent_blocks(group, status)
    return {
        "stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split"),
        "path": str(path), "total": int(live.sum()), "ok": int(((status == OK) & live).sum()),
        "failed": int(failed_rows.size), "pending": int(((status == PENDING) & live).sum()),
        "complete": not pending_blocks(group), "fingerprint": attrs.get("fingerprint"),
        "failures": failure_table(group, shown), "failure_reasons": failure_reasons(group, failed_rows),
        "damaged": f"{len(bad)} finished blocks without status" if bad else None,
        **snapshot_counts(group, live, status),
    }


def failure_reasons(group: zarr.Group, failed_rows: np.ndarray) -> dict[str, int]:
    """How many of ``failed_rows`` failed for each kind of reason (the reason's text before its details)."""
    if not failed_rows.size:
        return {}
    import re

    reasons, counts = np.unique(np.asarray(group["reason"][:])[failed_rows], return_counts=True)
    kinds: dict[str, int] = {}
    for reason, count in zip(reasons.tolist(), counts.tolist(), strict=True):
        kind = re.split(r"[:(]", str(reason), maxsplit=1)[0].strip() or "failed"
        kinds[kind] = kinds.get(kind, 0) + int(count)
    return dict(sorted(kinds.items(), key=lambda kc: -kc[1]))


def read_array(group: zarr.Group, name: str, sel: Any = slice(None)) -> np.ndarray:
    """``group[name][sel]``, with damaged bytes (a failed checksum, a truncated chunk) as :class:`DamagedStore`."""
    try:
        return group[name][sel]
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise DamagedStore(f"array {name!r} of {location_of(group)} cannot be read ({read_error(e)}): run "
                           "`pipeline verify --repair`") from None


def location_of(group: zarr.Group) -> str:
    """The store's path as a user typed it (``file://`` dropped)."""
    return str(group.store_path).removeprefix("file://")


def check_bookkeeping(group: zarr.Group, path: str | Path) -> None:
    """Refuse a per-video store whose statuses contradict its done markers (cheap: whole columns)."""
    if "status" not in group or DONE_ARRAY not in group:
        return
    bad = inconsistent_blocks(group)
    if bad:
        raise DamagedStore(f"{path} is damaged ({len(bad)} finished blocks have no status): run "
                           "`pipeline verify --repair`, then re-run its stage")


def inconsistent_blocks(group: zarr.Group, status: np.ndarray | None = None) -> list[int]:
    """Finished blocks with a pending row or a failed row without a reason (``status``: if already read)."""
    status = read_array(group, "status") if status is None else status
    reason = read_array(group, "reason")
    done = read_array(group, DONE_ARRAY)
    n, size = int(group.attrs["n"]), int(group.attrs["block_size"])
    n_blocks = (n + size - 1) // size
    block_of = np.arange(n) // size
    row_done = done[:n_blocks][block_of].astype(bool)
    empty_reason = np.array([not r for r in as_text(reason[status == FAILED])], bool)
    failed_rows = np.flatnonzero(status == FAILED)
    bad_rows = np.concatenate([np.flatnonzero(row_done & (status == PENDING)), failed_rows[empty_reason]])
    return np.unique(block_of[bad_rows]).tolist()


def find_stores(root: str | os.PathLike) -> list[tuple[Path, zarr.Group | None]]:
    """Every stage output (a Zarr group with a ``stage`` attribute) under ``root``, sorted by path.

    An output whose metadata cannot be read comes with ``None`` instead of its group: it is
    reported as damaged, never dropped (arrays live only inside outputs, so a ``zarr.json`` that
    no output above holds is an output's).
    """
    found: list[tuple[Path, zarr.Group | None]] = []
    root = as_path(root)
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # a compaction's work in progress
        if "zarr.json" in filenames:
            dirnames[:] = []  # do not descend into its arrays
            try:
                group = zarr.open_group(str(dirpath), mode="r")
            except Exception:  # noqa: BLE001 - any unreadable metadata means a damaged output
                found.append((dirpath, None))
                continue
            if "stage" in group.attrs:
                found.append((dirpath, group))
    return found


def damaged_entry(path: Path, root: Path, why: str) -> dict[str, Any]:
    """A status entry for an output that cannot be summarised."""
    try:
        parts = PurePosixPath(str(path)[len(str(root)):].strip("/")).parts
    except ValueError:
        parts = ()
    return {"stage": parts[0] if parts else None, "dataset": parts[1] if len(parts) > 1 else None,
            "split": parts[-1] if len(parts) > 2 else "-", "path": str(path), "total": 0, "ok": 0, "failed": 0,
            "pending": 0, "complete": False, "fingerprint": None, "failures": [], "damaged": why}


# ---- damage a reader can see cheaply ---------------------------------------------------------------

# Columns only the coordinating process writes: its records of which work is done.
BOOKKEEPING = ("status", "reason", DONE_ARRAY, DIGEST_ARRAY)
# Arrays written block by block by workers: row i of each is video i.
BLOCK_ARRAYS = ("frames", "frame_index", "timestamp", "source_frames", "box", "features")
# Arrays a store of each stage has, for stores made before they recorded their ``arrays`` attribute.
STAGE_ARRAYS = {
    "frames": ("frames", "frame_index", "timestamp", "source_frames", "status", "reason", DONE_ARRAY, "video_id",
               "path", "label", "start", "end"),
    "features": ("features", "status", "reason", DONE_ARRAY, "video_id", "path", "label"),
    "heads": ("head",), "labels": ("embeddings",),
}
# Arrays whose chunks existed whenever a block had an ok row, even in stores that skipped fill chunks.
NEVER_FILL = ("frames", "features", "source_frames", "box")


def block_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of one block's per-video arrays (names sorted; bytes elements length-prefixed; numbers
    little-endian): what the worker wrote, recomputed by ``verify`` from what is read back."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        values = np.asarray(arrays[name])
        h.update(f"{name}:{values.shape}".encode())
        if values.dtype == object:
            for v in values.reshape(-1).tolist():
                b = v if isinstance(v, (bytes, bytearray)) else str(v).encode()
                h.update(len(b).to_bytes(8, "little") + bytes(b))
        else:
            h.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def expected_arrays(group: zarr.Group) -> tuple[str, ...]:
    """The arrays this store must hold: as recorded at creation, else its stage's."""
    recorded = group.attrs.get("arrays")
    return tuple(recorded) if recorded else STAGE_ARRAYS.get(str(group.attrs.get("stage")), ())


def _list_keys(group: zarr.Group) -> list[str]:
    """Every key under the group (metadata and chunk files), from one listing of its store."""
    root = getattr(group.store, "root", None)
    if root is not None:
        # A local store: scandir lists a Kinetics-size store (~80,000 chunk files, a folder each) several times
        # faster than the store's async listing (benchmarks/bench_scale.py: `status` and summaries).
        keys: list[str] = []
        folders = [(os.path.join(str(root), group.path) if group.path else str(root), "")]
        while folders:
            folder, head = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append((entry.path, head + entry.name + "/"))
                else:
                    keys.append(head + entry.name)
        return keys
    from zarr.core.sync import sync

    prefix = group.path + "/" if group.path else ""

    async def collect() -> list[str]:
        return [k[len(prefix):] async for k in group.store.list_prefix(prefix)]

    return sync(collect())


def open_arrays(group: zarr.Group, keys: list[str]) -> tuple[dict[str, zarr.Array], list[str]]:
    """The store's arrays by name, and problems of their metadata: an expected array missing (its zarr.json
    deleted), or metadata that cannot be parsed."""
    present = {k[: -len("/zarr.json")] for k in keys if k.endswith("/zarr.json")}
    problems = [f"array {name!r} is missing" for name in expected_arrays(group) if name not in present]
    arrays: dict[str, zarr.Array] = {}
    for name in sorted(present):
        try:
            arrays[name] = group[name]
        except Exception as e:  # noqa: BLE001 - any unreadable array metadata is damage
            problems.append(f"array {name!r} has unreadable metadata ({type(e).__name__})")
    return arrays, problems


def missing_chunks(group: zarr.Group, arrays: dict[str, zarr.Array], keys: list[str],
                   status: np.ndarray, done: np.ndarray) -> tuple[dict[str, list[int]], list[str]]:
    """({per-video array: finished blocks with an ok video whose chunk file is missing}, problems of columns
    with a missing chunk file), from one listing of the store."""
    chunks: dict[str, set[int]] = {}
    for k in keys:
        name, sep, rest = k.partition("/c/")
        if sep and name in arrays:
            first = rest.split("/", 1)[0]
            if first.isdigit():
                chunks.setdefault(name, set()).add(int(first))
    all_chunks = bool(group.attrs.get("all_chunks"))
    lost: dict[str, list[int]] = {}
    if "block_size" in group.attrs:
        n, size = int(group.attrs["n"]), int(group.attrs["block_size"])
        n_blocks = (n + size - 1) // size
        has_ok = np.zeros(n_blocks, bool)
        has_ok[np.flatnonzero(status[:n] == OK) // size] = True
        needed = set(np.flatnonzero(has_ok & (done[:n_blocks] == 1)).tolist())
        for name in BLOCK_ARRAYS:
            if name in arrays and (all_chunks or name in NEVER_FILL):
                missing = sorted(needed - chunks.get(name, set()))
                if missing:
                    lost[name] = missing
    column_problems = []
    if all_chunks:  # stores made before could skip a column chunk equal to the fill value
        for name, arr in arrays.items():
            if name in BLOCK_ARRAYS or not arr.shape or arr.shape[0] == 0:
                continue
            outer = arr.shards[0] if arr.shards else arr.chunks[0]
            missing = sorted(set(range((arr.shape[0] + outer - 1) // outer)) - chunks.get(name, set()))
            if not missing:
                continue
            if name in BOOKKEEPING and "block_size" in group.attrs:
                # lost bookkeeping means lost records of work: the blocks it covered are done again
                size, n_blocks = int(group.attrs["block_size"]), n_blocks_of(group)
                per_block = name in (DONE_ARRAY, DIGEST_ARRAY)
                blocks: set[int] = set()
                for i in missing:
                    lo, hi = i * outer, (i + 1) * outer
                    blocks.update(range(lo, min(hi, n_blocks)) if per_block
                                  else range(lo // size, min((hi + size - 1) // size, n_blocks)))
                lost[name] = sorted(blocks)
            else:
                column_problems.append(f"{name}: chunk file {missing[0]} is missing")
    return lost, column_problems


def cheap_damage(group: zarr.Group, keys: list[str] | None = None) -> list[str]:
    """Damage seen without reading any data: arrays whose metadata is missing or unreadable, chunk files
    missing under finished work (one listing of the store), chunk files of the wrong size (uncompressed
    arrays), and altered small arrays (heads, label embeddings: their sha256). Empty when none is seen.
    ``verify`` reads everything; this is what ``status`` and every reader check at open."""
    keys = _list_keys(group) if keys is None else keys
    arrays, problems = open_arrays(group, keys)
    if problems:
        return problems
    for name in ("head", "embeddings"):
        if name in arrays and arrays[name].attrs.get("sha256") is not None:
            try:
                same = arrays[name].attrs["sha256"] == values_sha256(arrays[name][...])
            except Exception:  # noqa: BLE001 - a failed checksum
                same = False
            if not same:
                problems.append(f"{name}: a chunk is missing or altered")
    status = done = np.zeros(0)
    if "status" in arrays and DONE_ARRAY in arrays:
        try:
            status, done = arrays["status"][:], arrays[DONE_ARRAY][:]
        except Exception as e:  # noqa: BLE001 - a failed checksum of the bookkeeping
            return problems + [f"the bookkeeping cannot be read ({type(e).__name__})"]
    lost, column_problems = missing_chunks(group, arrays, keys, status, done)
    for name, blocks in lost.items():
        problems.append(f"{name}: {len(blocks)} chunk file(s) of finished blocks are missing "
                        f"(block {blocks[0]}{', ...' if len(blocks) > 1 else ''})")
    problems += column_problems
    problems += _wrong_sizes(group, arrays, keys)
    return problems


def _wrong_sizes(group: zarr.Group, arrays: dict[str, zarr.Array], keys: list[str]) -> list[str]:
    """Chunk files of uncompressed, unsharded numeric arrays (features) whose size is not the chunk's: a
    truncated or padded file. Local stores only (a stat per chunk file)."""
    root = getattr(group.store, "root", None)
    if root is None:
        return []
    problems = []
    for name, arr in arrays.items():
        codecs = [type(c).__name__ for c in arr.metadata.codecs] if hasattr(arr.metadata, "codecs") else []
        if arr.shards or codecs != ["BytesCodec", "Crc32cCodec"] or arr.dtype == object:
            continue
        expected = int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4  # + the CRC-32C
        base = Path(str(root)) / group.path
        for k in keys:
            if k.startswith(f"{name}/c/"):
                try:
                    size = (base / k).stat().st_size
                except OSError:
                    continue
                if size != expected:
                    problems.append(f"{name}: chunk file {k} has {size} bytes, not {expected} (truncated or altered)")
                    break
    return problems


def delete_block_chunks(group: zarr.Group, blocks: np.ndarray) -> None:
    """Delete the chunk files of the given blocks in every per-video array, so that recomputing a damaged
    block writes fresh files (a truncated shard would otherwise be read back when a short last block is
    written). Call under the writer lock."""
    from zarr.core.sync import sync

    for name in BLOCK_ARRAYS:
        if name not in group:
            continue
        arr = group[name]
        for b in np.asarray(blocks, np.int64).tolist():
            key = arr.metadata.encode_chunk_key((int(b),) + (0,) * (arr.ndim - 1))
            sync((arr.store_path / key).delete())


# ---- the row life cycle: grow, shrink, snapshots ---------------------------------------------------------
#
# Rows are keyed by video id. A change (videos added, dropped, or redone: dropped and added again) is one new
# snapshot of the store: ``version`` counts them, and each row records the snapshot it came in (``added_in``)
# and the one it left in (``dropped_in``, 0 while live), so the live rows of any snapshot can be told apart.
# Appended rows start at a block boundary: a short last block is padded with VOID rows, and a finished block is
# never written again. Data of dropped rows stays until ``pipeline compact`` rewrites the store without them.

ADDED, DROPPED = "added_in", "dropped_in"
CHANGE = "change"  # the attribute that marks a change in progress (see :func:`apply_change`)
PER_BLOCK = (DONE_ARRAY, DIGEST_ARRAY)


def rows_of(group: zarr.Group) -> int:
    """The rows of a per-video store as its last snapshot recorded them (VOID and dropped rows included)."""
    return int(group.attrs["n"])


def version_of(group: zarr.Group) -> int:
    """The store's snapshot number (0: made before snapshots were recorded, store format 2)."""
    return int(group.attrs.get("version", 0))


def live_rows(added: np.ndarray, dropped: np.ndarray, version: int) -> np.ndarray:
    """bool mask of the rows live at snapshot ``version``: added by then and not yet dropped (VOID rows have
    ``added_in`` 0 and are never live)."""
    return (added >= 1) & (added <= version) & ((dropped == 0) | (dropped > version))


def snapshot_hash(video_ids: np.ndarray, added: np.ndarray, live: np.ndarray) -> str:
    """sha256 of a snapshot's live set: its videos in row order, each with the snapshot it came in (a redone
    video came in later). Row positions are left out: compaction moves rows, not what they hold."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(added[live], dtype="<i4").tobytes())
    h.update("\0".join(str(v) for v in np.asarray(video_ids)[live].tolist()).encode())
    return h.hexdigest()


def snapshot_of(group: zarr.Group) -> dict[str, Any]:
    """{"version", "hash"} of the store's current snapshot: what downstream outputs and runs record."""
    entries = group.attrs.get("snapshots") or []
    return {"version": version_of(group), "hash": entries[-1]["hash"] if entries else None}


def snapshot_entry(group: zarr.Group, version: int) -> dict[str, Any]:
    """The recorded description of snapshot ``version`` (its live count, classes, ...), or a one-line error."""
    for entry in group.attrs.get("snapshots") or []:
        if int(entry["version"]) == version:
            return dict(entry)
    raise PipelineError(f"{location_of(group)} has no snapshot {version}")


def resolve_snapshot(group: zarr.Group, snapshot: int | None) -> int:
    """``snapshot``, checked against the snapshots the store can still show; None: the current one."""
    current = version_of(group)
    if snapshot is None:
        return current
    if current == 0:
        raise PipelineError(f"{location_of(group)} was made before stores recorded snapshots (store format 2): "
                            "it has only its current rows")
    oldest = int(group.attrs.get("oldest_snapshot", 1))
    if not oldest <= int(snapshot) <= current:
        why = (" (`pipeline compact` removed the rows of older ones)" if oldest > 1 else "")
        raise PipelineError(f"{location_of(group)} has snapshots {oldest} to {current}; not {snapshot}{why}")
    return int(snapshot)


def live_mask(group: zarr.Group, snapshot: int | None = None) -> np.ndarray:
    """bool [n]: the rows live at ``snapshot`` (None: the current one). Every reader selects rows with it, so
    dropped and VOID rows are never served. Stores made before snapshots: every row."""
    n = rows_of(group) if "n" in group.attrs else int(group["status"].shape[0])
    if ADDED not in group:
        resolve_snapshot(group, snapshot)
        return np.ones(n, bool)
    version = resolve_snapshot(group, snapshot)
    added, dropped = read_array(group, ADDED)[:n], read_array(group, DROPPED)[:n]
    return live_rows(added, dropped, version)


def snapshot_counts(group: zarr.Group, live: np.ndarray | None = None,
                    status: np.ndarray | None = None) -> dict[str, Any]:
    """``version``, ``snapshot`` (its hash) and ``dropped`` (rows masked until a compaction), for summaries."""
    if ADDED not in group or group.attrs.get(CHANGE):
        return {"version": version_of(group), "snapshot": snapshot_of(group)["hash"], "dropped": 0}
    live = live_mask(group) if live is None else live
    n = live.size
    status = read_array(group, "status")[:n] if status is None else status[:n]
    return {"version": version_of(group), "snapshot": snapshot_of(group)["hash"],
            "dropped": int(((~live) & (status != VOID)).sum())}


def create_lifecycle(group: zarr.Group, n: int, video_ids: np.ndarray, status: np.ndarray | None = None,
                     classes: int = 0) -> dict[str, Any]:
    """``added_in`` and ``dropped_in`` of a new store whose ``n`` rows are its first snapshot; returns the
    attributes that describe it (``version``, ``snapshots``), for the caller to write with its own."""
    added = np.full(n, 1, np.int32)
    if status is not None:
        added[np.asarray(status) == VOID] = 0
    dropped = np.zeros(n, np.int32)
    create_column(group, ADDED, added)
    create_column(group, DROPPED, dropped)
    live = live_rows(added, dropped, 1)
    entry = {"version": 1, "hash": snapshot_hash(video_ids, added, live), "rows": n, "live": int(live.sum()),
             "added": int(live.sum()), "dropped": 0, "classes": classes}
    return {"version": 1, "snapshots": [entry], "oldest_snapshot": 1}


def written_slice(group: zarr.Group, block: int) -> slice:
    """The rows of ``block`` its worker writes: the block without the VOID rows that pad its end (a block that
    was short when rows were appended after it). Its digest covers these rows only."""
    rows = block_slice(group, block)
    if ADDED not in group:
        return rows
    real = np.flatnonzero(read_array(group, ADDED, rows) != 0)
    return slice(rows.start, rows.start + (int(real[-1]) + 1 if real.size else 0))


def _row_arrays(group: zarr.Group) -> list[str]:
    """The arrays with one row per video (every array of a per-video store but the per-block ones)."""
    return [name for name in sorted(group.array_keys()) if name not in PER_BLOCK]


def _refresh_digests(group: zarr.Group) -> None:
    """Recompute the sha256 of every column that carries one (they changed with the rows)."""
    for name in _row_arrays(group):
        arr = group[name]
        if arr.attrs.get("sha256") is not None:
            arr.attrs["sha256"] = values_sha256(np.asarray(arr[...]))


def settle(group: zarr.Group) -> None:
    """Undo what an interrupted change wrote (a writer killed between :func:`apply_change`'s first write and
    its commit): arrays back to the rows of the last snapshot, that change's drop marks cleared. A writer
    then computes the change again from its inputs and writes the same bytes. Call under the writer lock."""
    pending = group.attrs.get(CHANGE)
    if not pending:
        return
    n, version = rows_of(group), version_of(group)
    n_blocks = n_blocks_of(group)
    for name in sorted(group.array_keys()):
        arr = group[name]
        rows = n_blocks if name in PER_BLOCK else n
        if arr.shape[0] != rows:
            arr.resize((rows, *arr.shape[1:]))
    if DROPPED in group:
        dropped = group[DROPPED][:]
        if (dropped > version).any():
            dropped[dropped > version] = 0
            group[DROPPED][:] = dropped
    _refresh_digests(group)
    group.attrs[CHANGE] = None


@dataclass
class Change:
    """One new snapshot of a per-video store (see :func:`apply_change`).

    ``columns``: for each per-video column (``status`` and ``reason`` included; not ``added_in``,
    ``dropped_in`` nor the block arrays), its values for the appended rows; ``drop``: rows that leave;
    ``refresh``: in-place updates of bookkeeping columns that change no row's content (a file's new mtime);
    ``attrs``: attributes of the new snapshot (class names)."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    drop: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    refresh: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    # A store that mirrors another (features follow their frames, row for row): the row its appended rows start
    # at (rows copied as they are, VOID padding included) and the other store's snapshot list, its own from now.
    at: int | None = None
    mirror: list[dict] | None = None

    @property
    def added(self) -> int:
        return int(len(self.columns["status"])) if self.columns else 0

    @property
    def empty(self) -> bool:
        return not self.added and not len(self.drop) and not self.attrs and self.mirror is None


def apply_change(group: zarr.Group, change: Change) -> dict[str, Any]:
    """Write ``change`` as the store's next snapshot; returns its entry in the ``snapshots`` attribute.

    Crash-safe: ``change`` is first recorded in the attributes (a change in progress: readers refuse the store,
    the next writer :func:`settle` s it), then arrays are resized and the new rows' columns written (VOID rows
    padding the last block, new rows from the next block boundary), drop marks set, and last the attributes
    (``n``, ``version``, ``snapshots``) commit it in one write. The new rows' blocks are pending: the stage's
    block machinery (workers, ledger, resume, digests) fills them. Only columns are written: whole columns, no
    per-row access. Call under the writer lock."""
    old_n, size = rows_of(group), int(group.attrs["block_size"])
    version = int(change.mirror[-1]["version"]) if change.mirror else version_of(group) + 1
    if change.at is not None:
        start = change.at
    else:
        start = -(-old_n // size) * size if change.added else old_n
    n = start + change.added
    group.attrs[CHANGE] = {"version": version, "rows": n}
    if n > old_n:
        n_blocks = -(-n // size)
        for name in _row_arrays(group):
            group[name].resize((n, *group[name].shape[1:]))
        for name in PER_BLOCK:
            if name in group:
                group[name].resize((n_blocks,))
        void = start - old_n
        given = {ADDED: np.full(change.added, version, np.int32), DROPPED: np.zeros(change.added, np.int32),
                 **change.columns}
        for name in _row_arrays(group):
            if name in BLOCK_ARRAYS:
                continue  # written by the workers, block by block
            arr = group[name]
            if name not in given:
                raise PipelineError(f"internal: no values of {name!r} for the rows appended to {location_of(group)}")
            values = np.asarray(given[name])
            pad = np.full((void, *arr.shape[1:]), VOID if name == "status" else 0 if name == ADDED
                          else arr.fill_value, dtype=values.dtype if values.dtype.kind not in "OUT" else object)
            both = np.concatenate([pad, values.astype(pad.dtype)]) if void else values
            arr[old_n:n] = np.array(both.tolist(), dtype=np.str_) if both.dtype.kind in "OUT" else both
        # new blocks (those past the last one the store had); a block made only of rows known to fail (files
        # missing from the dataset) or of padding needs no worker
        status = np.concatenate([np.full(void, VOID, np.int8), np.asarray(change.columns["status"], np.int8)])
        first = -(-old_n // size)
        if first < n_blocks:
            padded = np.ones((n_blocks - first) * size, bool)
            region = status[first * size - old_n:]
            padded[:region.size] = (region == FAILED) | (region == VOID)
            group[DONE_ARRAY][first:n_blocks] = padded.reshape(-1, size).all(axis=1).astype(np.uint8)
            if DIGEST_ARRAY in group:
                group[DIGEST_ARRAY][first:n_blocks] = np.array([""] * (n_blocks - first), dtype=np.str_)
    if len(change.drop):
        dropped = group[DROPPED][:]
        dropped[np.asarray(change.drop, np.int64)] = version
        group[DROPPED][:] = dropped
    for name, (rows, values) in change.refresh.items():
        group[name].oindex[np.asarray(rows, np.int64)] = values
    _refresh_digests(group)
    if change.mirror:
        snapshots = [dict(e) for e in change.mirror]
    else:
        added, dropped = group[ADDED][:], group[DROPPED][:]
        live = live_rows(added, dropped, version)
        entry = {"version": version, "hash": snapshot_hash(group["video_id"][:], added, live), "rows": n,
                 "live": int(live.sum()), "added": change.added, "dropped": int(len(change.drop)),
                 "classes": len(change.attrs.get("class_names", group.attrs.get("class_names", [])))}
        snapshots = [*(group.attrs.get("snapshots") or []), entry]
    group.attrs.update({**change.attrs, "n": n, "version": version, "snapshots": snapshots, CHANGE: None})
    return snapshots[-1]


def refresh_columns(group: zarr.Group, refresh: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """In-place updates of bookkeeping columns that leave every row's content as it is (no new snapshot)."""
    for name, (rows, values) in refresh.items():
        group[name].oindex[np.asarray(rows, np.int64)] = values
    if refresh:
        _refresh_digests(group)


def address_of(group: zarr.Group) -> str:
    """Where a store is, as an output made from it records it: an absolute path (or the URL), never one
    relative to the caller's working directory."""
    st = group.store
    if getattr(st, "root", None) is not None:  # a local store
        return str((Path(st.root) / group.path).absolute())
    fs = getattr(st, "fs", None)
    if fs is not None:  # fsspec: the URL other processes open it by
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return f"{protocol}://{'/'.join(p for p in (str(st.path).strip('/'), group.path) if p)}"
    return location_of(group)


def snapshots_behind(recorded: dict[str, dict]) -> list[str]:
    """For each input an output recorded (``{name: {"path", "version"}}``), whether that store has moved to
    another snapshot since: e.g. ``["train: snapshot 3, now 4"]``. An output made from an older snapshot is
    not invalid (its rows are still there); it is older than its inputs, and saying so is the point."""
    behind = []
    for name, entry in recorded.items():
        if not isinstance(entry, dict) or not entry.get("path") or not entry.get("version"):
            continue
        try:
            now = version_of(zarr.open_group(str(entry["path"]), mode="r"))
        except (FileNotFoundError, OSError, ValueError, KeyError):
            continue
        if now != int(entry["version"]):
            behind.append(f"{name}: snapshot {entry['version']}, now {now}")
    return behind


def compact_into(src: zarr.Group, dst_path: str | os.PathLike, fp: str,
                 on_rows: Callable[[int], None] | None = None, attrs: dict[str, Any] | None = None) -> zarr.Group:
    """Write a copy of the finished per-video store ``src`` at ``dst_path`` without its dropped and VOID rows:
    the live rows, in their order, packed into full blocks (no decoding: bytes are copied; block digests made
    afresh). The copy is the next snapshot of the same videos (same live set, same hash); the snapshots before
    the last drop can no longer be shown (``oldest_snapshot``). ``fp``: the copy's fingerprint (compaction moves
    rows, so outputs aligned with the old rows must not match it). ``on_rows``: progress, in rows copied;
    ``attrs``: attributes that change with the copy (written before its fingerprint)."""
    n_old, size = rows_of(src), int(src.attrs["block_size"])
    status = read_array(src, "status")[:n_old]
    live = live_mask(src)
    keep = np.flatnonzero(live)
    gone = np.flatnonzero(~live & (status != VOID))
    n, n_blocks = int(keep.size), -(-int(keep.size) // size)
    dst = zarr.open_group(str(dst_path), mode="w")
    for name in sorted(src.array_keys()):
        a = src[name]
        rows = n_blocks if name in PER_BLOCK else n
        dst.create_array(name, shape=(rows, *a.shape[1:]), dtype=a.metadata.data_type, chunks=a.chunks,
                         shards=a.shards, compressors=a.compressors, filters=a.filters, serializer=a.serializer,
                         fill_value=a.fill_value, dimension_names=a.metadata.dimension_names)
        if a.attrs.get("sha256") is not None:
            dst[name].attrs["sha256"] = ""  # made afresh below, once its values are written
    for name in _row_arrays(src):
        if name in BLOCK_ARRAYS:
            continue
        values = np.asarray(src[name][:n_old])[keep]
        if name == DROPPED:
            values = np.zeros(n, np.int32)
        if n:
            dst[name][:] = np.array(values.tolist(), dtype=np.str_) if values.dtype.kind in "OUT" else values
    names = [name for name in BLOCK_ARRAYS if name in src]
    digests = []
    for b in range(n_blocks):
        rows = keep[b * size:(b + 1) * size]
        written = {}
        for name in names:
            values = src[name].oindex[rows]
            dst[name][b * size:b * size + rows.size] = values
            written[name] = values
        digests.append(block_digest(written))
        if on_rows is not None:
            on_rows(int(rows.size))
    if n_blocks:
        dst[DONE_ARRAY][:] = np.ones(n_blocks, np.uint8)
        if DIGEST_ARRAY in dst:
            dst[DIGEST_ARRAY][:] = np.array(digests, dtype=np.str_)
    _refresh_digests(dst)
    version = version_of(src) + 1
    added = read_array(dst, ADDED)[:] if ADDED in dst else np.ones(n, np.int32)
    entry = {"version": version, "hash": snapshot_hash(read_array(dst, "video_id")[:], added, np.ones(n, bool)),
             "rows": n, "live": n, "added": 0, "dropped": 0, "compacted": int(gone.size),
             "classes": len(src.attrs.get("class_names", []))}
    dropped_in = read_array(src, DROPPED)[:n_old] if DROPPED in src else np.zeros(n_old, np.int32)
    oldest = max(int(src.attrs.get("oldest_snapshot", 1)), int(dropped_in[gone].max()) if gone.size else 1)
    changed = attrs or {}
    attrs = {k: v for k, v in src.attrs.items() if k not in ("fingerprint", CHANGE)}
    attrs.update({**changed, "n": n, "version": version, "snapshots": [*(src.attrs.get("snapshots") or []), entry],
                  "oldest_snapshot": oldest, "compactions": int(src.attrs.get("compactions", 0)) + 1,
                  "compacted_from": {"version": version_of(src), "fingerprint": src.attrs.get("fingerprint")}})
    dst.attrs.update(attrs)
    dst.attrs["fingerprint"] = fp  # last: a copy without it is an unfinished one
    return dst


def swap_in(path: Path, new: Path) -> None:
    """Put the finished store at ``new`` in place of the one at ``path`` (local disks: two renames; a crash
    between them is finished by :func:`finish_swap`). Call under the writer lock of ``path``."""
    old = path.parent / f".{path.name}.old"
    if old.exists():
        remove_tree(old)
    os.rename(path, old)
    os.rename(new, path)
    remove_tree(old)


def finish_swap(path: Path) -> None:
    """Finish a :func:`swap_in` killed between its renames: the new store is put in place."""
    new, old = path.parent / f".{path.name}.compact", path.parent / f".{path.name}.old"
    if not is_remote(path) and not path.exists() and (new / "zarr.json").exists() and old.exists():
        os.rename(new, path)
        remove_tree(old)
