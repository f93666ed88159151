"""Index coding and value quantization against vectorised NumPy.

Indices: k = n/100 sorted random indices out of n, as top-k or random-k leave them. The NumPy
baselines are vectorised but do not validate their input (edgefl's coders check order and range
on encode and everything on decode): gap-1 varints from ``np.diff``, a bitmap through
``np.packbits`` / ``np.unpackbits``; for Rice coding the baseline is edgefl's own NumPy twin.
Values: quantizing the n values of a dense update; ``astype(np.float16)`` and the int8 idiom
``np.rint(v / scale).astype(np.int8)``.
"""
import numpy as np

from harness import Comparison

import edgefl.kernels as K
from edgefl._kernels.fallback import codec as twin


def numpy_encode_varint(idx):
    gaps = np.diff(idx.astype(np.int64), prepend=-1) - 1
    sizes = 1 + sum((gaps >= 1 << (7 * b)).astype(np.int64) for b in range(1, 5))
    starts = np.cumsum(sizes) - sizes
    out = np.zeros(int(sizes.sum()), np.uint8)
    for b in range(5):
        more = sizes > b
        out[starts[more] + b] = (gaps[more] >> (7 * b)) & 0x7F | np.where(sizes[more] > b + 1, 0x80, 0)
    return out.tobytes()


def numpy_decode_varint(buf):
    data = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts + 1
    gaps = np.zeros(ends.size, np.int64)
    for b in range(5):
        more = sizes > b
        gaps[more] |= (data[starts[more] + b] & 0x7F).astype(np.int64) << (7 * b)
    return (np.cumsum(gaps + 1) - 1).astype(np.uint32)


def numpy_encode_bitmap(idx, n):
    mask = np.zeros(n, bool)
    mask[idx] = True
    return np.packbits(mask, bitorder="little").tobytes()


def numpy_decode_bitmap(buf):
    return np.flatnonzero(np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")).astype(np.uint32)


def numpy_quantize_int8(vals):
    scale = np.abs(vals).max() / np.float32(127)
    return np.clip(np.rint(vals / scale), -127, 127).astype(np.int8).tobytes(), float(scale)


def numpy_dequantize_int8(buf, scale):
    return np.frombuffer(buf, np.int8).astype(np.float32) * np.float32(scale)


def comparisons(sizes):
    cases = []
    for n in sizes:
        rng = np.random.default_rng(n)
        k = max(1, n // 100)
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.uint32)
        varint = K.encode_indices(idx, n)
        rice = K.encode_indices_rice(idx, n)
        bitmap = K.encode_indices_bitmap(idx, n)
        note = f"k = n/100 = {k}"
        cases += [
            Comparison("encode_indices", n, edgefl=lambda idx=idx, n=n: K.encode_indices(idx, n),
                       numpy=lambda idx=idx: numpy_encode_varint(idx), note=note + ", np.diff + varint"),
            Comparison("decode_indices", n, edgefl=lambda b=varint, n=n, k=k: K.decode_indices(b, n, k),
                       numpy=lambda b=varint: numpy_decode_varint(b), note=note + ", unchecked NumPy"),
            Comparison("encode_indices_rice", n, edgefl=lambda idx=idx, n=n: K.encode_indices_rice(idx, n),
                       numpy=lambda idx=idx, n=n: twin.encode_indices_rice(idx, n),
                       note=f"{note}, {len(rice)} B vs varint {len(varint)} B; NumPy twin"),
            Comparison("decode_indices_rice", n,
                       edgefl=lambda b=rice, n=n, k=k: K.decode_indices_rice(b, n, k),
                       numpy=lambda b=rice, n=n, k=k: twin.decode_indices_rice(b, n, k),
                       note=note + ", NumPy twin (per-element loop)"),
            Comparison("encode_indices_bitmap", n,
                       edgefl=lambda idx=idx, n=n: K.encode_indices_bitmap(idx, n),
                       numpy=lambda idx=idx, n=n: numpy_encode_bitmap(idx, n), note=note + ", np.packbits"),
            Comparison("decode_indices_bitmap", n,
                       edgefl=lambda b=bitmap, n=n, k=k: K.decode_indices_bitmap(b, n, k),
                       numpy=lambda b=bitmap: numpy_decode_bitmap(b), note=note + ", np.unpackbits"),
        ]
        vals = rng.standard_normal(n, dtype=np.float32)
        half, _ = K.quantize(vals, "f16")
        int8, int8_scale = K.quantize(vals, "int8")
        cases += [
            Comparison("quantize f16", n, edgefl=lambda v=vals: K.quantize(v, "f16"),
                       numpy=lambda v=vals: v.astype("<f2").tobytes(), note="astype(float16)"),
            Comparison("dequantize f16", n, edgefl=lambda b=half, n=n: K.dequantize(b, "f16", n, 1.0),
                       numpy=lambda b=half: np.frombuffer(b, "<f2").astype(np.float32),
                       note="frombuffer + astype(float32)"),
            Comparison("quantize int8", n, edgefl=lambda v=vals: K.quantize(v, "int8"),
                       numpy=lambda v=vals: numpy_quantize_int8(v), note="np.rint(v / scale)"),
            Comparison("dequantize int8", n,
                       edgefl=lambda b=int8, n=n, s=int8_scale: K.dequantize(b, "int8", n, s),
                       numpy=lambda b=int8, s=int8_scale: numpy_dequantize_int8(b, s),
                       note="astype(float32) * scale"),
            Comparison("quantize ternary", n, edgefl=lambda v=vals: K.quantize(v, "ternary"),
                       numpy=lambda v=vals: twin.quantize(v, "ternary"), note="NumPy twin"),
        ]
    return cases
