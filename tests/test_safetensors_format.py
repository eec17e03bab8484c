#!/usr/bin/python3
"""Checks our safetensors files against the format itself, through a reader and a writer written
here from the specification (https://github.com/huggingface/safetensors) with struct, json and
numpy alone, so that a mistake shared by our C reader and writer cannot hide.

  1. tests/tools/safetensors_roundtrip writes known tensors and metadata; the independent reader
     parses the file and checks the layout (header length a multiple of 8, space padding, tensors
     back to back), names, dtypes, shapes, values bit for bit and metadata.
  2. The independent writer makes files in shapes our writer never produces (pretty-printed and
     \\u-escaped header, odd header length, keys and data in different orders); the C reader must
     report each tensor's dtype, shape, place and the checksum of its bytes, and the metadata.
  3. Files that break the format are refused with a message naming the file.

Usage: test_safetensors_format.py TOKENFORMER_BINARY SCRATCH_DIR (the tool is found next to the
binary, which itself is not used)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np

from testlib import check, exit_status

# Bytes per element, and the numpy type that holds an element's bits.
DTYPE_BITS = {
    "BOOL": (1, "u1"), "U8": (1, "u1"), "I8": (1, "u1"), "F8_E5M2": (1, "u1"), "F8_E4M3": (1, "u1"),
    "I16": (2, "<u2"), "U16": (2, "<u2"), "F16": (2, "<u2"), "BF16": (2, "<u2"),
    "I32": (4, "<u4"), "U32": (4, "<u4"), "F32": (4, "<u4"),
    "I64": (8, "<u8"), "U64": (8, "<u8"), "F64": (8, "<u8"),
}
# The numpy type of an element's value, where numpy has one.
DTYPE_VALUES = {"BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "I32": "<i4",
                "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8"}


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


# ---- the independent reader ----------------------------------------------------------------------

def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate keys in %s" % keys)
    return dict(pairs)


def read_safetensors(path):
    """Returns (header length, header bytes, entries in header order, metadata, tensors as
    {name: (dtype, shape, raw bytes, begin, end)}), checking the rules of the format."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8:8 + n]
    parsed = json.loads(header.decode("utf-8"), object_pairs_hook=no_duplicates)
    data = blob[8 + n:]
    metadata = parsed.get("__metadata__", {})
    assert all(isinstance(v, str) for v in metadata.values())
    tensors = {}
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        size, _ = DTYPE_BITS[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        assert all(isinstance(d, int) and d >= 0 for d in shape), shape
        assert end - begin == int(np.prod(shape, dtype=np.int64)) * size, (name, shape, begin, end)
        assert 0 <= begin <= end <= len(data), (name, begin, end, len(data))
        tensors[name] = (entry["dtype"], shape, data[begin:end], begin, end)
    spans = sorted((t[3], t[4], name) for name, t in tensors.items() if t[4] > t[3])
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        assert begin_b >= end_a, "%s and %s overlap" % (a, b)
    return n, header, list(parsed.items()), metadata, tensors, len(data)


def bits(raw, dtype):
    return np.frombuffer(raw, dtype=DTYPE_BITS[dtype][1])


def values(raw, dtype, shape):
    return np.frombuffer(raw, dtype=DTYPE_VALUES[dtype]).reshape(shape)


# ---- 1. our writer, read here --------------------------------------------------------------------

KNOWN_METADATA = {
    "format": "pt",
    "config": '{"dim": 96, "classes": ["T-shirt/top", "Trouser"]}',
    "unicode": "h\u00e9llo \u4e16\u754c \U0001F600",
    "escapes": "quote \" backslash \\ newline \n tab \t control \x01 end",
    "empty": "",
}


def known_tensors():
    """The tensors safetensors_roundtrip writes, as {name: (dtype, shape, bits)} in write order."""
    i24, i15 = np.arange(24), np.arange(15)
    f32 = ((((37 * i24) % 101) - 50).astype(np.float32) / np.float32(8)).view("<u4").copy()
    f32[:5] = [0x7fc12345, 0x80000000, 0x7f800000, 0x00000001, 0xffa00001]
    f64 = ((((53 * i15) % 97) - 48).astype(np.float64) / 16.0).view("<u8").copy()
    f64[:2] = [0x7ff8deadbeef0001, 0x8000000000000000]
    i64 = ((np.arange(5, dtype=np.int64) - 2) * 1000000000007)
    i64[4] = np.iinfo(np.int64).min
    return {
        "f32": ("F32", [4, 6], f32),
        "f64": ("F64", [3, 5], f64),
        "bf16": ("BF16", [10], ((4099 * np.arange(10) + 17) % 65536).astype("<u2")),
        "f16": ("F16", [2, 2, 2], ((2731 * np.arange(8) + 5) % 65536).astype("<u2")),
        "i64": ("I64", [5], i64.view("<u8")),
        "i32": ("I32", [2, 3], (np.arange(6, dtype=np.int32) ** 2 - 7).view("<u4")),
        "u8": ("U8", [7], ((40 * np.arange(7)) % 256).astype("u1")),
        "bool": ("BOOL", [3], (np.arange(3) % 2).astype("u1")),
        "scalar": ("F32", [], np.array([3.25], dtype="<f4").view("<u4")),
        "empty": ("F32", [0, 3], np.zeros(0, dtype="<u4")),
        "blocks.0.attn.q.key_tokens": ("F32", [3, 4], (np.arange(12, dtype=np.float32) / 4).view("<u4")),
    }


def check_our_file(tool, path):
    subprocess.run([tool, "write", path], check=True)
    n, header, entries, metadata, tensors, data_size = read_safetensors(path)
    expected = known_tensors()
    check(n % 8 == 0, "header length %d is not a multiple of 8" % n)
    text = header.rstrip(b" ")
    check(len(header) - len(text) < 8 and text.endswith(b"}"), "header padding: %r" % header[-10:])
    check(b"\n" not in text, "our header is compact JSON")
    names = [name for name, _ in entries]
    check(names == ["__metadata__"] + list(expected), "header order %s" % names)
    check(metadata == KNOWN_METADATA, "metadata %r" % metadata)
    end = 0
    for name, (dtype, shape, want) in expected.items():
        got_dtype, got_shape, raw, begin, stop = tensors[name]
        check(got_dtype == dtype and got_shape == shape, "%s: %s %s" % (name, got_dtype, got_shape))
        check(begin == end, "%s starts at %d, not right after the previous tensor (%d)" % (name, begin, end))
        check(np.array_equal(bits(raw, dtype), want), "%s: bits differ" % name)
        end = stop
    check(end == data_size, "data section has %d bytes, tensors end at %d" % (data_size, end))
    # A few values as values, not bits: the special floats mean what they should.
    f32 = values(tensors["f32"][2], "F32", [4, 6])
    check(np.isnan(f32[0, 0]) and np.signbit(f32[0, 1]) and f32[0, 1] == 0 and np.isposinf(f32[0, 2]),
          "f32 specials %s" % f32[0, :4])
    check(f32[1, 0] == ((37 * 6) % 101 - 50) / 8, "f32[1, 0] = %s" % f32[1, 0])
    check(values(tensors["scalar"][2], "F32", []) == 3.25, "scalar")
    check(values(tensors["i64"][2], "I64", [5])[0] == -2000000000014, "i64")
    return tensors


# ---- 2. files written here, read by our reader ---------------------------------------------------

def write_safetensors(path, tensors, metadata, header_order, data_order, indent=None, ascii_only=True,
                      pad=False):
    """Writes tensors {name: (dtype, shape, raw bytes)} with the header keys in header_order and the
    bytes in data_order; returns the header length."""
    offsets, data, at = {}, bytearray(), 0
    for name in data_order:
        raw = tensors[name][2]
        offsets[name] = [at, at + len(raw)]
        data += raw
        at += len(raw)
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in header_order:
        dtype, shape, _ = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets[name]}
    text = json.dumps(header, indent=indent, ensure_ascii=ascii_only).encode("utf-8")
    if pad:
        text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + bytes(data))
    return len(text)


def random_tensors(rng):
    f32 = rng.standard_normal((5, 7)).astype("<f4")
    f32.view("<u4").reshape(-1)[:3] = [0x7f800123, 0xffc00000, 0x80000000]  # NaN payloads, -0.0
    spec = {
        "patch_embed.proj.weight": ("F32", f32),
        "pos_embed": ("F32", rng.standard_normal((1, 17, 96)).astype("<f4")),
        "f64": ("F64", rng.standard_normal((3, 3))),
        "f16": ("F16", rng.integers(0, 1 << 16, 4, dtype="<u2")),
        "bf16": ("BF16", rng.integers(0, 1 << 16, (2, 3), dtype="<u2")),
        "i64": ("I64", rng.integers(-(1 << 62), 1 << 62, 3, dtype="<i8")),
        "i32": ("I32", rng.integers(-(1 << 30), 1 << 30, (2, 2), dtype="<i4")),
        "i16": ("I16", rng.integers(-(1 << 15), 1 << 15, 5, dtype="<i2")),
        "i8": ("I8", rng.integers(-128, 128, 3, dtype="i1")),
        "u8": ("U8", rng.integers(0, 256, 11, dtype="u1")),
        "u16": ("U16", rng.integers(0, 1 << 16, 2, dtype="<u2")),
        "u32": ("U32", rng.integers(0, 1 << 32, 2, dtype="<u4")),
        "u64": ("U64", rng.integers(0, 1 << 63, 2, dtype="<u8")),
        "bool": ("BOOL", rng.integers(0, 2, 6).astype("?")),
        "scalar": ("F64", np.array(-0.0)),
        "empty": ("I32", np.zeros((2, 0), dtype="<i4")),
        "h\u00e9ad.weight": ("F32", np.array([1.5, -2.5], dtype="<f4")),
    }
    return {name: (dtype, list(array.shape), array.tobytes()) for name, (dtype, array) in spec.items()}


def run_reader(tool, path):
    result = subprocess.run([tool, "read", path], capture_output=True)
    if not check(result.returncode == 0, "reading %s: %s" % (path, result.stderr.decode(errors="replace"))):
        return None
    return json.loads(result.stdout.decode("utf-8"))


def check_reader_report(report, tensors, metadata, parsed, n, file_size, what):
    """Compares the C reader's report with what was written and with the independent parse."""
    check(report["data_start"] == 8 + n and report["file_size"] == file_size, "%s: sizes" % what)
    check(report["metadata"] == (metadata or {}), "%s: metadata %r" % (what, report["metadata"]))
    reported = {t["name"]: t for t in report["tensors"]}
    check(sorted(reported) == sorted(tensors), "%s: names %s" % (what, sorted(reported)))
    offsets = [t["offset"] for t in report["tensors"]]
    check(offsets == sorted(offsets), "%s: table not in file order" % what)
    for name, (dtype, shape, raw) in tensors.items():
        t = reported.get(name)
        if not check(t is not None, "%s: %s missing" % (what, name)):
            continue
        check(t["dtype"] == dtype and t["shape"] == shape, "%s: %s is %s %s" % (what, name, t["dtype"], t["shape"]))
        check(t["offset"] == 8 + n + parsed[name][3], "%s: %s at %d" % (what, name, t["offset"]))
        check(t["nbytes"] == len(raw) and t["numel"] == int(np.prod(shape, dtype=np.int64)),
              "%s: %s size" % (what, name))
        check(int(t["fnv1a64"], 16) == fnv1a64(raw), "%s: %s checksum" % (what, name))


def check_their_files(tool, scratch):
    rng = np.random.default_rng(20240601)
    tensors = random_tensors(rng)
    names = list(tensors)
    metadata = dict(KNOWN_METADATA, extra="\u00fcber \U0001F680 \\u0041")
    layouts = {
        # pretty, \\u escapes (a surrogate pair for the emoji), unpadded, data in reverse order
        "pretty": dict(header_order=names, data_order=names[::-1], indent=2, ascii_only=True, pad=False),
        # compact raw UTF-8 padded like the reference library, header keys shuffled
        "padded": dict(header_order=list(rng.permutation(names)), data_order=names, ascii_only=False, pad=True),
        # no metadata, keys and data in two other orders
        "bare": dict(header_order=list(rng.permutation(names)), data_order=list(rng.permutation(names)),
                     indent=0, pad=False),
    }
    for what, layout in layouts.items():
        path = os.path.join(scratch, "python_%s.safetensors" % what)
        meta = None if what == "bare" else metadata
        n = write_safetensors(path, tensors, meta, **layout)
        parsed = read_safetensors(path)[4]  # the writer here obeys the rules the reader checks
        report = run_reader(tool, path)
        if report is not None:
            check_reader_report(report, tensors, meta, parsed, n, os.path.getsize(path), what)
    return tensors


# ---- 3. broken files -----------------------------------------------------------------------------

def expect_refused(tool, path, needle, what):
    result = subprocess.run([tool, "read", path], capture_output=True)
    message = result.stderr.decode("utf-8", errors="replace")
    check(result.returncode == 1, "%s: exit status %d" % (what, result.returncode))
    check(path in message and needle in message, "%s: message %r lacks the path or %r" % (what, message, needle))


def check_broken_files(tool, scratch, tensors):
    small = {name: tensors[name] for name in ["patch_embed.proj.weight", "f64", "u8"]}
    names = list(small)
    path = os.path.join(scratch, "broken.safetensors")
    n = write_safetensors(path, small, {"k": "v"}, names, names, pad=True)
    blob = open(path, "rb").read()

    open(path, "wb").write(blob[:-1])
    expect_refused(tool, path, 'truncated: tensor "u8" needs bytes up to %d but the file has only %d'
                   % (len(blob), len(blob) - 1), "last byte cut")
    open(path, "wb").write(blob[:8 + n // 2])
    expect_refused(tool, path, "is larger than the", "header cut")
    open(path, "wb").write(blob[:5])
    expect_refused(tool, path, "fewer than the 8", "length field cut")
    open(path, "wb").write(struct.pack("<Q", 1 << 40) + blob[8:])
    expect_refused(tool, path, "is absurd", "absurd header length")

    def with_header(header):
        text = json.dumps(header).encode()
        open(path, "wb").write(struct.pack("<Q", len(text)) + text + blob[8 + n:])

    good = json.loads(blob[8:8 + n])
    cases = [
        ("__metadata__", {"k": 1}, 'metadata "k" is not a string'),
        ("u8", dict(good["u8"], dtype="F4"), 'unknown dtype "F4"'),
        ("u8", dict(good["u8"], shape=[-11]), "is negative"),
        ("u8", {"dtype": "U8", "shape": [11]}, 'has no "data_offsets"'),
        ("u8", dict(good["u8"], data_offsets=[0, 11]), "overlap"),
        ("f64", dict(good["f64"], shape=[3, 4]), "needs 96"),
    ]
    for key, value, needle in cases:
        with_header(dict(good, **{key: value}))
        expect_refused(tool, path, needle, "%s = %s" % (key, value))
    open(path, "wb").write(struct.pack("<Q", 4) + b"[1,]" + blob[8 + n:])
    expect_refused(tool, path, "not valid JSON", "broken JSON")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    tool = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "safetensors_roundtrip")
    scratch = sys.argv[2]
    os.makedirs(scratch, exist_ok=True)
    if not os.access(tool, os.X_OK):
        print("FAIL: %s is missing: build the safetensors_roundtrip target" % tool, file=sys.stderr)
        return 1

    ours = os.path.join(scratch, "ours.safetensors")
    ours_tensors = check_our_file(tool, ours)
    # Our reader agrees with the independent one on our own file too.
    report = run_reader(tool, ours)
    if report is not None:
        for t in report["tensors"]:
            check(int(t["fnv1a64"], 16) == fnv1a64(ours_tensors[t["name"]][2]), "ours: %s checksum" % t["name"])
        check(report["metadata"] == KNOWN_METADATA, "ours: metadata read back")
    tensors = check_their_files(tool, scratch)
    check_broken_files(tool, scratch, tensors)
    return exit_status("test_safetensors_format")


if __name__ == "__main__":
    sys.exit(main())
