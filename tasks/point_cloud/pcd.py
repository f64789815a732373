"""Read and write PCD files (Point Cloud Library format, v0.7), ASCII and binary, without open3d.

The format (https://pointclouds.org/documentation/tutorials/pcd_file_format.html): a text header
of ``KEY value...`` lines (``VERSION``, ``FIELDS``, ``SIZE``, ``TYPE`` F/I/U, ``COUNT``, ``WIDTH``,
``HEIGHT``, ``VIEWPOINT``, ``POINTS``) ended by ``DATA ascii|binary|binary_compressed``, then the
points: whitespace-separated rows, or packed little-endian records, one field after the other.
PCN's clouds are plain xyz in float32. ``binary_compressed`` (LZF) is refused with a clear error.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("I", 1): "i1", ("I", 2): "<i2", ("I", 4): "<i4",
          ("I", 8): "<i8", ("U", 1): "u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8"}
_ENCODINGS = ("ascii", "binary")


class PCDError(ValueError):
    """A PCD file that cannot be read: names the file and what is wrong."""


@dataclass(frozen=True)
class PCDHeader:
    """The parsed header of a PCD file."""

    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    points: int
    data: str

    def dtype(self) -> np.dtype:
        """The record layout of one point (binary data)."""
        return np.dtype([
            (name, _TYPES[(kind, size)], (count,)) if count > 1 else (name, _TYPES[(kind, size)])
            for name, size, kind, count in zip(self.fields, self.sizes, self.types, self.counts)
        ])


def _parse_header(stream: io.BufferedReader, path: Path) -> PCDHeader:
    values: dict[str, list[str]] = {}
    while True:
        raw = stream.readline()
        if not raw:
            raise PCDError(f"{path}: header ends without a DATA line")
        line = raw.decode("ascii", errors="replace").strip()
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split()
        values[key.upper()] = rest
        if key.upper() == "DATA":
            break
    missing = [k for k in ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT", "POINTS", "DATA") if k not in values]
    if missing:
        raise PCDError(f"{path}: header lacks {', '.join(missing)}")
    fields = tuple(values["FIELDS"])
    counts = tuple(int(c) for c in values.get("COUNT", ["1"] * len(fields)))
    sizes, types = tuple(int(s) for s in values["SIZE"]), tuple(t.upper() for t in values["TYPE"])
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise PCDError(f"{path}: FIELDS, SIZE, TYPE and COUNT have different lengths")
    for kind, size in zip(types, sizes):
        if (kind, size) not in _TYPES:
            raise PCDError(f"{path}: unsupported field type {kind}{size}; valid: "
                           + ", ".join(f"{t}{s}" for t, s in _TYPES))
    data = values["DATA"][0].lower() if values["DATA"] else ""
    if data not in _ENCODINGS:
        raise PCDError(f"{path}: DATA {data!r} is not supported; valid: {', '.join(_ENCODINGS)} "
                       "(convert binary_compressed files with pcl_convert_pcd_ascii_binary)")
    return PCDHeader(fields, sizes, types, counts, int(values["WIDTH"][0]), int(values["HEIGHT"][0]),
                     int(values["POINTS"][0]), data)


def read_pcd_header(path: str | Path) -> PCDHeader:
    """Only the header of a PCD file."""
    with open(path, "rb") as stream:
        return _parse_header(stream, Path(path))


def read_pcd(path: str | Path, fields: tuple[str, ...] = ("x", "y", "z")) -> np.ndarray:
    """The named fields of every point, as float32.

    Args:
        path: a PCD file (ASCII or binary).
        fields: fields to return, in this order (each must have COUNT 1).

    Returns:
        [N, len(fields)] float32.
    """
    path = Path(path)
    with open(path, "rb") as stream:
        header = _parse_header(stream, path)
        body = stream.read()
    unknown = [f for f in fields if f not in header.fields]
    if unknown:
        raise PCDError(f"{path}: no field {', '.join(unknown)}; the file has {', '.join(header.fields)}")
    if header.data == "binary":
        dtype = header.dtype()
        if len(body) < header.points * dtype.itemsize:
            raise PCDError(f"{path}: {header.points} points need {header.points * dtype.itemsize} bytes "
                           f"of data, found {len(body)}")
        records = np.frombuffer(body, dtype=dtype, count=header.points)
        return np.stack([records[name].astype(np.float32) for name in fields], axis=-1)
    columns = sum(header.counts)
    numbers = np.array(body.split(), dtype=np.float64)
    if numbers.size != header.points * columns:
        raise PCDError(f"{path}: {header.points} points x {columns} values expected, found {numbers.size}")
    table = numbers.reshape(header.points, columns)
    offsets = np.cumsum((0, *header.counts))
    return np.stack([table[:, offsets[header.fields.index(name)]] for name in fields], axis=-1).astype(
        np.float32)


def write_pcd(path: str | Path, points: np.ndarray, *, binary: bool = True) -> None:
    """Write xyz points [N, 3] as a float32 PCD file (binary, or ASCII with exact 9-digit floats)."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"write_pcd: points must have shape [N, 3], got {points.shape}")
    count = points.shape[0]
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\n"
        f"TYPE F F F\nCOUNT 1 1 1\nWIDTH {count}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {count}\n"
        f"DATA {'binary' if binary else 'ascii'}\n"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(header.encode("ascii"))
        if binary:
            stream.write(points.astype("<f4").tobytes())
        else:
            text = io.StringIO()
            np.savetxt(text, points, fmt="%.9g")
            stream.write(text.getvalue().encode("ascii"))
