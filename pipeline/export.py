"""Write stored arrays to interchange formats: NumPy ``.npz`` or HDF5 (h5py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from .errors import PipelineError
from .progress import Progress

FORMATS = ("npz", "h5")


def export_arrays(out: str | os.PathLike, fmt: str, arrays: Mapping[str, zarr.Array | np.ndarray],
                  attrs: Mapping[str, Any], rows_per_read: int = 64, quiet: bool = True) -> Path:
    """Write ``arrays`` (same first dimension) and ``attrs`` to ``out`` as ``fmt``.

    HDF5 is written block by block, so exporting a large store needs memory for one block only;
    ``.npz`` must hold everything in memory at once. String arrays become UTF-8 strings.
    """
    if fmt not in FORMATS:
        raise PipelineError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if fmt == "npz":
        data = {k: _plain(v[...]) for k, v in arrays.items()}
        data.update({f"attr_{k}": np.asarray(v) for k, v in attrs.items()})
        with open(tmp, "wb") as f:
            np.savez(f, **data)
    else:
        rows = sum(int(a.shape[0]) for a in arrays.values() if a.ndim > 1)
        with h5py.File(tmp, "w") as f, Progress(rows, f"export {out.name}", quiet or rows < 1024, unit="row") as bar:
            for key, value in attrs.items():
                f.attrs[key] = value
            for name, arr in arrays.items():
                if arr.dtype.kind in "UOT":
                    f.create_dataset(name, data=np.array(arr[...].tolist(), dtype=object),
                                     dtype=h5py.string_dtype())
                    continue
                dset = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype,
                                        chunks=(1, *arr.shape[1:]) if arr.ndim > 1 and arr.shape[0] else None,
                                        compression="gzip" if arr.ndim > 2 else None)
                for lo in range(0, arr.shape[0], rows_per_read):
                    dset[lo:lo + rows_per_read] = arr[lo:lo + rows_per_read]
                    if arr.ndim > 1:
                        bar.update(min(rows_per_read, arr.shape[0] - lo))
    os.replace(tmp, out)
    return out


def _plain(a: np.ndarray) -> np.ndarray:
    # numpy's variable-width StringDType (how zarr returns strings) is not savable by np.savez.
    return np.array(a.tolist(), dtype=np.str_) if a.dtype.kind in "OT" else a
