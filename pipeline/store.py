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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import UnstableSpecificationWarning

from .cachefs import as_path, is_remote, remove_tree, walk
from .errors import DamagedStore, FingerprintMismatch, PipelineError, StoreLocked, read_error

# Variable-length strings and bytes are not yet frozen in the Zarr v3 spec; zarr-python reads
# and writes them fine and we pin zarr's minor version, so the warning is noise for our users.
warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
# Every chunk a writer touches is written, even when it equals the fill value (zarr skips those by default):
# a missing chunk file then always means lost data, which `status` and every reader can see from a listing.
zarr.config.set({"array.write_empty_chunks": True})

FORMAT_VERSION = 2  # 2: bookkeeping columns in whole-column chunks, locks beside the stores
DONE_ARRAY = "block_done"
DIGEST_ARRAY = "block_digest"  # per block: sha256 of its per-video arrays as the worker wrote them
# Bookkeeping columns (status, reason, block_done) are written by the one coordinating process in
# chunks of this many rows, so that a summary of 246,000 videos reads a handful of chunks.
COLUMN_CHUNK = 65536
PENDING, OK, FAILED = 0, 1, 2


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
                init: Callable[[zarr.Group], None]) -> zarr.Group:
    """Open the output at ``path`` for writing, creating it with ``init`` when needed.

    A store whose fingerprint matches is resumed. One made with other parameters is an error,
    or is deleted and rebuilt with ``replace_mismatched``. A store whose creation was interrupted
    (no fingerprint yet) holds no finished work and is rebuilt. Call under :func:`writer_lock`.
    """
    path = as_path(path)
    if (path / "zarr.json").exists():
        try:
            group = open_group(path, mode="r+")
        except DamagedStore as e:
            if not replace_mismatched:
                raise DamagedStore(f"{e}; re-run with --replace-mismatched to rebuild it") from None
            group = None
        old = group.attrs.get("fingerprint") if group is not None else None
        if old == fp:
            check_bookkeeping(group, path)
            return group
        if old is not None and not replace_mismatched:
            changed = _changed_keys(group.attrs.get("params", {}), params)
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


def bounded_block(n: int, block: int, row_bytes: int = 0) -> int:
    """A block size no larger than the rows that exist, nor than 2 GiB of rows in memory."""
    cap = max(1, MAX_BLOCK_BYTES // row_bytes) if row_bytes > 0 else block
    return max(1, min(int(block), max(1, n), cap))


def create_per_video(group: zarr.Group, name: str, n: int, block: int, inner: tuple[int, ...], dtype: Any,
                     fill_value: Any = 0, compress: bool = True, chunk_per_video: bool = True) -> zarr.Array:
    """A per-video data array [n, *inner], sharded by blocks of ``block`` videos, one chunk per video.

    Shards are the unit of work and of writing (one writer each); a chunk per video keeps random
    reads (training loaders) cheap. Small arrays, and arrays read whole (``chunk_per_video=False``:
    features), use plain chunks of one block.
    """
    block = bounded_block(n, block)
    shape = (n, *inner)
    kwargs: dict[str, Any] = {"compressors": checksummed(compress)}
    if chunk_per_video and inner and int(np.prod(inner)) * np.dtype(dtype).itemsize >= 4096:
        kwargs.update(chunks=(1, *inner), shards=(block, *inner))
    else:
        kwargs.update(chunks=(block, *inner))
    return group.create_array(name, shape=shape, dtype=dtype, fill_value=fill_value,
                              dimension_names=dims_of(name, len(shape)), **kwargs)


def create_column(group: zarr.Group, name: str, values: np.ndarray, digest: bool = True) -> zarr.Array:
    """A per-video column written once, whole (ids, paths, labels), with the sha256 of its values.

    ``digest=False`` for bookkeeping columns, which the ledger rewrites.
    """
    values = np.asarray(values)
    dtype = str if values.dtype.kind in "UTO" else values.dtype
    chunk = max(1, min(len(values), COLUMN_CHUNK))
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
    block = bounded_block(n, block)
    n_blocks = max(1, (n + block - 1) // block)
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
        self._buffer: list[tuple[int, np.ndarray, np.ndarray, str]] = []
        self._last = -float("inf")  # the first finished block is recorded at once

    def record(self, result: BlockResult) -> None:
        self._buffer.append((result.block, np.asarray(result.status, np.int8),
                             np.asarray(result.reasons, dtype=object), result.digest))
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buffer:
            return
        self._buffer.sort(key=lambda item: item[0])
        blocks = np.array([b for b, _, _, _ in self._buffer])
        rows = block_rows(self.group, blocks)
        status = np.concatenate([s for _, s, _, _ in self._buffer])
        reasons = np.concatenate([r for _, _, r, _ in self._buffer]).astype(str)
        self.group["reason"].oindex[rows] = reasons
        self.group["status"].oindex[rows] = status
        if DIGEST_ARRAY in self.group:
            self.group[DIGEST_ARRAY].oindex[blocks] = np.array([d for _, _, _, d in self._buffer], dtype=np.str_)
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
    problems = cheap_damage(group)
    if "status" not in group or problems:
        rows = int(attrs.get("n", attrs.get("rows", len(attrs.get("class_names", [])))))
        entry = {"stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split", "-"),
                 "path": str(path), "total": rows, "ok": 0 if problems else rows, "failed": 0, "pending": 0,
                 "complete": not problems, "fingerprint": attrs.get("fingerprint"), "failures": [],
                 "failure_reasons": {}, "damaged": "; ".join(problems[:3]) if problems else None}
        return entry
    status = group["status"][:]
    failed_rows = np.flatnonzero(status == FAILED)
    shown = failed_rows if max_failures is None else failed_rows[:max_failures]
    bad = inconsistent_blocks(group, status)
    return {
        "stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split"),
        "path": str(path), "total": int(status.size), "ok": int((status == OK).sum()),
        "failed": int(failed_rows.size), "pending": int((status == PENDING).sum()),
        "complete": not pending_blocks(group), "fingerprint": attrs.get("fingerprint"),
        "failures": failure_table(group, shown), "failure_reasons": failure_reasons(group, failed_rows),
        "damaged": f"{len(bad)} finished blocks without status" if bad else None,
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
        dirnames.sort()
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
