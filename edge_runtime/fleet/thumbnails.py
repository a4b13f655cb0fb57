"""Small PNG thumbnails of frames for label requests, without PIL (it is not a dependency).

A PNG is a signature and three chunks: IHDR (size, 8-bit, grey or RGB), IDAT (zlib of the rows,
each prefixed with filter byte 0) and IEND; each chunk ends with the CRC-32 of its type and data.
:func:`decode_png` reads back exactly what :func:`encode_png` writes (8-bit grey/RGB/RGBA,
non-interlaced, any of the five row filters), for the tests and the operator's CLI; it is not a
general PNG reader.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from edge_runtime.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
_CHANNELS = {v: k for k, v in _COLOR_TYPE.items()}


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A frame as uint8 (H, W) or (H, W, C): floats in [0, 1] are scaled by 255 (values above
    1 are taken as already 0..255); NaN/Inf become 0."""
    img = np.asarray(image)
    if img.dtype == np.uint8:
        return img
    f = np.nan_to_num(img.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if f.size and f.max() <= 1.0:
        f = f * 255.0
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Fit the longer side to ``size`` pixels: area averaging when shrinking, nearest when
    growing (a thumbnail for a person to label, not a resampling filter)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return image
    # Each output pixel averages the source pixels whose centres fall in its cell; growing
    # leaves one source pixel per cell, which is nearest-neighbour.
    if nh > h or nw > w:
        yi = np.minimum((np.arange(nh) * h) // nh, h - 1)
        xi = np.minimum((np.arange(nw) * w) // nw, w - 1)
        return image[yi][:, xi]
    ys = np.minimum((np.arange(h) * nh) // h, nh - 1)
    xs = np.minimum((np.arange(w) * nw) // w, nw - 1)
    f = image.astype(np.float64)
    extra = f.shape[2:]
    acc = np.zeros((nh, nw, *extra))
    cnt = np.zeros((nh, nw))
    np.add.at(acc, (ys[:, None], xs[None, :]), f)
    np.add.at(cnt, (ys[:, None], xs[None, :]), 1.0)
    out = acc / cnt.reshape(nh, nw, *([1] * len(extra)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PNG bytes (other dtypes: to_uint8)."""
    img = to_uint8(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in _COLOR_TYPE or min(img.shape[:2]) < 1:
        raise InputError(f"cannot encode an image of shape {tuple(np.shape(image))} as PNG")
    h, w, c = img.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * c)], axis=1)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (8-bit grey/RGB/RGBA, non-interlaced) -> uint8 (H, W) or (H, W, C)."""
    if not data.startswith(PNG_SIGNATURE):
        raise InputError("not a PNG (bad signature)")
    pos, idat, header = len(PNG_SIGNATURE), b"", None
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        if crc != zlib.crc32(kind + body):
            raise InputError(f"PNG chunk {kind!r} has a bad CRC")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + n
    if header is None:
        raise InputError("PNG has no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = header
    if depth != 8 or ctype not in _CHANNELS or interlace != 0:
        raise InputError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace)")
    c = _CHANNELS[ctype]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    out = np.zeros((h, w * c), np.int32)
    for y in range(h):
        out[y] = _unfilter(
            int(raw[y, 0]), raw[y, 1:].astype(np.int32), out[y - 1] if y else None, c
        )
    img = out.astype(np.uint8).reshape(h, w, c)
    return img[:, :, 0] if c == 1 else img


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray | None, bpp: int) -> np.ndarray:
    up = np.zeros_like(line) if prev is None else prev
    if kind == 0:
        return line
    if kind == 2:
        return (line + up) & 0xFF
    out = line.copy()
    for i in range(len(line)):  # Sub, Average and Paeth depend on the pixel just decoded
        left = out[i - bpp] if i >= bpp else 0
        ul = up[i - bpp] if i >= bpp else 0
        if kind == 1:
            pred = left
        elif kind == 3:
            pred = (left + up[i]) // 2
        elif kind == 4:
            p = left + up[i] - ul
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - ul)
            pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else ul)
        else:
            raise InputError(f"PNG row filter {kind} is not defined")
        out[i] = (out[i] + pred) & 0xFF
    return out


def thumbnail(image: np.ndarray, size: int) -> bytes:
    """One frame -> PNG bytes no larger than ``size`` pixels a side (grey stays grey; an alpha
    channel is dropped, labels do not need it)."""
    img = to_uint8(image)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return encode_png(resize(img, size))
