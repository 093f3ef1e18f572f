"""Write stored arrays to interchange formats: NumPy ``.npz`` or HDF5 (h5py)."""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from pipeline.core.errors import PipelineError
from pipeline.core.files import create_exclusive, describe_os_error
from pipeline.core.progress import Progress

FORMATS = ("npz", "h5")
SUFFIXES = {".npz": "npz", ".h5": "h5", ".hdf5": "h5"}


def format_of(out: str | os.PathLike, fmt: str | None = None) -> str:
    """The format that the suffix of ``out`` names; ``fmt``, when given, must be the same.

    A file's suffix is what every reader trusts (``np.load`` of a ``.npz`` that holds HDF5 fails far
    from here), so the two never disagree.
    """
    suffix = Path(out).suffix.lower()
    named = SUFFIXES.get(suffix)
    if named is None:
        raise PipelineError(f"--out {out}: name it .npz (NumPy) or .h5 (HDF5); its suffix chooses the format")
    if fmt is not None and fmt != named:
        raise PipelineError(f"format {fmt} contradicts --out {out}: a {suffix} file is {named}; the suffix chooses "
                            "the format (drop --format, or rename the file)")
    return named


def export_arrays(out: str | os.PathLike, fmt: str | None, arrays: Mapping[str, zarr.Array | np.ndarray],
                  attrs: Mapping[str, Any], rows_per_read: int = 64, quiet: bool = True) -> Path:
    """Write ``arrays`` (same first dimension) and ``attrs`` to ``out``, in the format its suffix names.

    Both formats are written ``rows_per_read`` rows at a time, so exporting a large store needs
    memory for one block (and the string columns) only. String arrays become UTF-8 strings (HDF5) or
    fixed-width unicode (``.npz``). ``fmt`` (optional) must agree with the suffix.
    """
    if fmt is not None and fmt not in FORMATS:
        raise PipelineError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    fmt = format_of(out, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    rows = sum(int(a.shape[0]) for a in arrays.values() if a.ndim > 1)
    try:
        create_exclusive(tmp).close()  # never through a link planted at the temporary name
        with Progress(rows, f"export {out.name}", quiet or rows < 1024, unit="row") as bar:
            if fmt == "npz":
                _write_npz(tmp, arrays, attrs, rows_per_read, bar)
            else:
                _write_h5(tmp, arrays, attrs, rows_per_read, bar)
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # no partial file is left, and the old one stays
        if isinstance(e, OSError):
            error = PipelineError(f"cannot write {out}: {describe_os_error(e)}")
            # HDF5 keeps a failed file open in its library and crashes at interpreter exit (exit 139): leave at once
            error.exit_now = fmt == "h5"  # type: ignore[attr-defined]
            raise error from None
        raise
    return out


# Kept free beside an HDF5 export: HDF5 cannot fail a write cleanly (a full disk makes it crash at exit), so an
# export stops with one line before the disk is that full.
H5_MARGIN = 64 << 20


def _room_for(path: Path, nbytes: int) -> None:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < nbytes + H5_MARGIN:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _write_h5(path: Path, arrays: Mapping[str, Any], attrs: Mapping[str, Any], rows_per_read: int,
              bar: Progress) -> None:
    with h5py.File(path, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, arr in arrays.items():
            if arr.dtype.kind in "UOT":
                f.create_dataset(name, data=np.array(arr[...].tolist(), dtype=object), dtype=h5py.string_dtype())
                continue
            dset = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype,
                                    chunks=(1, *arr.shape[1:]) if arr.ndim > 1 and arr.shape[0] else None,
                                    compression="gzip" if arr.ndim > 2 else None)
            for lo in range(0, arr.shape[0], rows_per_read):
                block = np.asarray(arr[lo:lo + rows_per_read])
                _room_for(path, block.nbytes)
                dset[lo:lo + rows_per_read] = block
                if arr.ndim > 1:
                    bar.update(min(rows_per_read, arr.shape[0] - lo))


def _write_npz(path: Path, arrays: Mapping[str, Any], attrs: Mapping[str, Any], rows_per_read: int,
               bar: Progress) -> None:
    """What ``np.savez`` writes (a stored zip of ``<name>.npy`` members), one block at a time.

    ``np.savez`` needs every array in memory at once: 240k videos x 8 frames x 512 float16 features
    are 2 GB, frames far more. Here each member is the ``.npy`` header for the array's full shape,
    then its rows' raw bytes in C order, block by block; zip64 from the start, because a member's
    size is not known to the zip writer before it is written.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                if arr.dtype.kind in "UOT" or arr.ndim == 0:  # string columns (fixed-width unicode), scalars
                    np.lib.format.write_array(f, _plain(np.asarray(arr[...])), allow_pickle=False)
                    continue
                dtype = np.dtype(arr.dtype)
                shape = tuple(int(n) for n in arr.shape)
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": shape})
                for lo in range(0, shape[0], rows_per_read):
                    block = np.ascontiguousarray(arr[lo:lo + rows_per_read], dtype=dtype)
                    expected = (min(rows_per_read, shape[0] - lo), *shape[1:])
                    if block.shape != expected:  # a short read would shift every later row
                        raise PipelineError(f"export of {name}: read {block.shape} at row {lo}, expected {expected}")
                    f.write(block.reshape(-1).view(np.uint8))  # the block's bytes, without a copy
                    if len(shape) > 1:
                        bar.update(expected[0])
        for key, value in attrs.items():
            with zf.open(f"attr_{key}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


class Selected:
    """Array-like view of some rows of ``source`` (a zarr array, or a view that takes row slices), in their order:
    what exports read of a store whose dropped videos are left out. Each read takes the span of rows it needs
    in one slice, then picks: the rows left out are few and scattered, so spans stay contiguous reads."""

    def __init__(self, source: Any, rows: np.ndarray) -> None:
        self.source, self.rows = source, np.asarray(rows, np.int64)
        self.shape = (len(self.rows), *source.shape[1:])
        self.dtype, self.ndim = source.dtype, len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        chosen = self.rows[slice(None) if key is Ellipsis else key]
        if chosen.size == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype if self.dtype != object else object)
        lo, hi = int(chosen.min()), int(chosen.max()) + 1
        return np.asarray(self.source[lo:hi])[chosen - lo]


def _plain(a: np.ndarray) -> np.ndarray:
    # numpy's variable-width StringDType (how zarr returns strings) is not savable by np.savez.
    return np.array(a.tolist(), dtype=np.str_) if a.dtype.kind in "OT" else a
