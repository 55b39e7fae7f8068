"""safetensors_ref.py - a numpy-only safetensors reader and writer, written from the format's
specification (github.com/huggingface/safetensors, README "Format"), to check moe.h's files
(tests/test_interchange.c). Needs only numpy (Debian: python3-numpy).

The format: 8 bytes N (unsigned little-endian), N bytes of UTF-8 JSON, then the byte buffer.
The JSON object maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the buffer's start), plus an optional "__metadata__" of string to
string. Row-major, little-endian. The specification's rules this reader enforces: no
duplicate keys, the header starts with '{' and may end with spaces, begin <= end, the shape's
bytes equal end - begin, and the tensors' ranges, sorted, cover the buffer exactly (no
overlap, no hole).

Run by tests/ref/hf_ref.py (make goldens) after test_interchange --write-refs wrote our files
into tests/ref/interchange/:
  - reads st_store_{f32,f16,bf16}.safetensors, checks them against the rules above, and
    writes safetensors_check.txt: per tensor a weighted sum (sum_i x_i * (i % 7 + 1), in
    float64) and the first and last values, which the C test recomputes from its own reading;
  - checks that our F16 and BF16 files hold numpy's round-to-nearest-even of our F32 file's
    values (float32 -> float16 by numpy's astype; -> bfloat16 on the bits);
  - writes st_store_{f32,f16,bf16}_numpy.safetensors with this writer (another JSON layout:
    spaces, tensors in reverse order, no metadata) from our F32 values, which the C test
    reads and compares with its own rounding, bit for bit.
"""
import json
import os
import struct

import numpy as np

DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8), "I64": ("<i8", 8),
          "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1), "U8": ("u1", 1), "BOOL": ("?", 1)}
MAX_HEADER = 100_000_000
HERE = os.path.dirname(os.path.abspath(__file__))
REF_DIR = os.path.join(HERE, "interchange")


class FormatError(ValueError):
    pass


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError("duplicate key %r" % k)
        d[k] = v
    return d


def bf16_to_f32(u16):
    return (np.asarray(u16, dtype=np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN"""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def read(path):
    """-> (dict name -> float32 numpy array (F32 / F16 / BF16 decoded, others as stored),
           dict name -> (dtype, shape, begin, end), metadata)"""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise FormatError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or n > len(blob) - 8:
        raise FormatError("header length %d does not fit the %d-byte file" % (n, len(blob)))
    text = blob[8:8 + n].decode("utf-8")
    if not text.startswith("{"):
        raise FormatError("the header does not start with '{'")
    header = json.loads(text, object_pairs_hook=_no_duplicates)
    buf = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", None)
    if meta is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError("__metadata__ must map strings to strings")
    info, ranges = {}, []
    for name, t in header.items():
        if set(t) != {"dtype", "shape", "data_offsets"}:
            raise FormatError("%s: fields %s" % (name, sorted(t)))
        if t["dtype"] not in DTYPES:
            raise FormatError("%s: unknown dtype %s" % (name, t["dtype"]))
        shape = t["shape"]
        begin, end = t["data_offsets"]
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not (0 <= begin <= end <= len(buf)):
            raise FormatError("%s: bad shape or offsets" % name)
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if numel * DTYPES[t["dtype"]][1] != end - begin:
            raise FormatError("%s: shape %s does not match %d bytes" % (name, shape, end - begin))
        info[name] = (t["dtype"], tuple(shape), begin, end)
        ranges.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(ranges):
        if begin != at:
            raise FormatError("%s: starts at %d, expected %d (overlap or hole)" % (name, begin, at))
        at = end
    if at != len(buf):
        raise FormatError("the tensors cover %d of %d bytes" % (at, len(buf)))
    out = {}
    for name, (dtype, shape, begin, end) in info.items():
        a = np.frombuffer(buf[begin:end], dtype=DTYPES[dtype][0]).reshape(shape)
        if dtype == "BF16":
            a = bf16_to_f32(a).reshape(shape)
        elif dtype in ("F32", "F16"):
            a = a.astype(np.float32)
        out[name] = a
    return out, info, meta


def write(path, tensors, metadata=None):
    """tensors: list of (name, dtype "F32" | "F16" | "BF16", array of that dtype's numpy type:
    float32, float16, or uint16 bits for BF16). Atomic: a temporary file, then rename."""
    header, offset, chunks = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, a in tensors:
        a = np.ascontiguousarray(a, dtype=DTYPES[dtype][0])
        data = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    text = json.dumps(header).encode("utf-8")  # ", " and ": " separators: not moe.h's layout
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return 8 + len(text) + offset


def encode(x, dtype):
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    return f32_to_bf16(x)


def weighted_sum(a):
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.sum(a * (np.arange(a.size) % 7 + 1)))


def main():
    lines = ["# written by tests/ref/safetensors_ref.py (numpy %s) from moe.h's files:" % np.__version__,
             "# file tensor dtype numel weighted_sum first last   (weighted sum: sum_i x_i (i % 7 + 1), float64)"]
    f32 = None
    total = 0
    for tag, dtype in (("f32", "F32"), ("f16", "F16"), ("bf16", "BF16")):
        name = "st_store_%s" % tag
        tensors, info, meta = read(os.path.join(REF_DIR, name + ".safetensors"))
        assert meta == {"format": "pt"}, meta
        for t, a in tensors.items():
            assert info[t][0] == dtype, (t, info[t])
            flat = a.reshape(-1)
            lines.append("%s %s %s %d %.17g %.9g %.9g" % (name, t, dtype, flat.size, weighted_sum(flat), flat[0], flat[-1]))
        if dtype == "F32":
            f32 = tensors
        else:  # our 16-bit files hold numpy's rounding of our F32 values
            raw, _, _ = read_raw(os.path.join(REF_DIR, name + ".safetensors"))
            for t in f32:
                mine = encode(f32[t], dtype).view(np.uint16)
                theirs = raw[t].view(np.uint16)
                bad = int(np.sum(mine != theirs))
                if bad:
                    raise AssertionError("%s/%s: %d values are not numpy's %s rounding" % (name, t, bad, dtype))
        out = [(t, dtype, encode(f32[t], dtype)) for t in reversed(list(f32))]
        total += write(os.path.join(REF_DIR, name + "_numpy.safetensors"), out)
        back, _, _ = read(os.path.join(REF_DIR, name + "_numpy.safetensors"))
        assert all(np.array_equal(back[t], tensors[t], equal_nan=True) for t in tensors), name
    path = os.path.join(REF_DIR, "safetensors_check.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("safetensors_ref: %d tensors checked, F16/BF16 rounding agrees, numpy's files written" % (len(lines) - 2))
    return total


def read_raw(path):
    """like read, but 16-bit tensors as their stored bits (uint16)"""
    tensors, info, meta = read(path)
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = {}
    for t, (dtype, shape, begin, end) in info.items():
        raw[t] = np.frombuffer(blob[8 + n + begin:8 + n + end], dtype="<u2" if DTYPES[dtype][1] == 2 else "<u4").reshape(shape)
    return raw, info, meta


if __name__ == "__main__":
    main()
