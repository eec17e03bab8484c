"""The loader's decoder (dataloader/decode.c) against libjpeg-turbo's own djpeg and against PIL.

Run as: /usr/bin/python3 tests/test_decode.py TOKENFORMER_BINARY SCRATCH_DIR
It drives tests/tools/decode_image (built next to the binary) on files made here from a real
photograph (Debian's mate-backgrounds):
- JPEG pixels equal djpeg's exactly: baseline 4:2:0, 4:2:2, 4:4:4, progressive, grayscale, optimised
  with restart markers, arithmetic coding, at odd sizes; and at the reduced scales 1/2, 1/4, 1/8
  equal `djpeg -scale 1/N`; the scale chosen for a minimum is the smallest allowed one;
- a CMYK JPEG written by PIL and a YCCK JPEG written by TurboJPEG decode to the right colours (PIL's
  conversion, and the original photograph within JPEG error);
- PNG (also named .JPEG), BMP, GIF, PPM, PGM and TGA equal PIL's pixels;
- a JPEG with extraneous bytes before a marker decodes (with a warning) to djpeg's pixels;
- truncated, empty, unknown and 30000x30000 files fail with the reason.
Needs: libjpeg-turbo-progs (cjpeg, djpeg), python3-pil, python3-numpy, mate-backgrounds.
"""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from testlib import check, exit_status

PHOTOS = [
    "/usr/share/backgrounds/mate/nature/Garden.jpg",
    "/usr/share/backgrounds/mate/nature/LadyBird.jpg",
    "/usr/share/backgrounds/mate/nature/FreshFlower.jpg",
]

def run(arguments, **kwargs):
    return subprocess.run(arguments, capture_output=True, **kwargs)


class Decoder:
    def __init__(self, tool, scratch):
        self.tool = tool
        self.out = os.path.join(scratch, "decoded.ppm")

    def decode(self, path, min_scale=None):
        """(pixels as HxWx3 uint8, the tool's stdout) or (None, stderr) on failure."""
        arguments = [self.tool] + (["--min-scale", repr(min_scale)] if min_scale else []) + [path, self.out]
        result = run(arguments)
        if result.returncode != 0:
            return None, result.stderr.decode()
        return np.asarray(Image.open(self.out).convert("RGB")), result.stdout.decode()


def djpeg(path, scale=None):
    arguments = ["djpeg", "-pnm"] + (["-scale", scale] if scale else []) + [path]
    result = run(arguments)
    assert result.returncode in (0, 2), result.stderr  # 2: decoded, with a warning
    out = path + ".djpeg.pnm"
    with open(out, "wb") as file:
        file.write(result.stdout)
    return np.asarray(Image.open(out).convert("RGB"))


def cjpeg(source, out, options):
    result = run(["cjpeg", "-quality", "90"] + options + ["-outfile", out, source])
    assert result.returncode == 0, result.stderr


def make_sources(scratch):
    photo = next((p for p in PHOTOS if os.path.exists(p)), None)
    if photo is None:
        print("FAIL: no photograph found (%s): apt-get install mate-backgrounds" % PHOTOS[0])
        sys.exit(1)
    reduced = os.path.join(scratch, "reduced.ppm")
    with open(reduced, "wb") as file:
        file.write(run(["djpeg", "-pnm", "-scale", "1/4", photo]).stdout)
    image = Image.open(reduced).convert("RGB")
    sources = {}
    for name, (width, height) in {"even": (336, 256), "odd": (333, 250), "tiny": (13, 7)}.items():
        path = os.path.join(scratch, "source_%s.ppm" % name)
        image.crop((40, 30, 40 + width, 30 + height)).save(path)
        sources[name] = path
    return sources


def test_jpeg_variants(decoder, sources, scratch):
    variants = {
        "baseline-420": ["-sample", "2x2"],
        "422": ["-sample", "2x1"],
        "444": ["-sample", "1x1"],
        "progressive": ["-progressive"],
        "grayscale": ["-grayscale"],
        "optimized-restart": ["-optimize", "-restart", "1"],
        "arithmetic": ["-arithmetic"],
    }
    for source_name, source in sources.items():
        for name, options in variants.items():
            path = os.path.join(scratch, "%s-%s.jpg" % (source_name, name))
            cjpeg(source, path, options)
            ours, note = decoder.decode(path)
            reference = djpeg(path)
            check(ours is not None and ours.shape == reference.shape and (ours == reference).all(),
                  "%s %s: pixels differ from djpeg (%s)" % (source_name, name, note.strip()))
            if source_name == "tiny":
                continue
            for denominator in (2, 4, 8):
                ours, note = decoder.decode(path, min_scale=1.0 / denominator)
                reference = djpeg(path, "1/%d" % denominator)
                check(ours is not None and ours.shape == reference.shape and (ours == reference).all(),
                      "%s %s at 1/%d: pixels differ from djpeg -scale (%s)" % (source_name, name, denominator,
                                                                                note.strip()))


def test_scale_choice(decoder, sources, scratch):
    path = os.path.join(scratch, "choice.jpg")
    cjpeg(sources["even"], path, [])
    for min_scale, expected in ((0.1, "scale 0.125"), (0.2, "scale 0.25"), (0.3, "scale 0.5"), (0.5, "scale 0.5"),
                                (0.51, "scale 1"), (0.9, "scale 1")):
        _, note = decoder.decode(path, min_scale=min_scale)
        check(expected in note, "min scale %g chose '%s', expected %s" % (min_scale, note.strip(), expected))


def test_cmyk(decoder, sources, scratch):
    original = np.asarray(Image.open(sources["even"]).convert("RGB")).astype(int)
    cmyk_path = os.path.join(scratch, "pil-cmyk.jpg")
    Image.open(sources["even"]).convert("CMYK").save(cmyk_path, quality=95)
    ycck_path = os.path.join(scratch, "turbojpeg-ycck.jpg")
    result = run([decoder.tool, "--encode-ycck", sources["even"], ycck_path])
    check(result.returncode == 0, "encode YCCK: %s" % result.stderr.decode())
    for name, path in (("CMYK by PIL", cmyk_path), ("YCCK by TurboJPEG", ycck_path)):
        check(Image.open(path).mode == "CMYK", "%s: PIL does not see a CMYK JPEG" % name)
        ours, note = decoder.decode(path)
        if not check(ours is not None, "%s: %s" % (name, note)):
            continue
        pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
        check(np.abs(ours - pil).max() <= 1, "%s: differs from PIL by %d" % (name, np.abs(ours - pil).max()))
        error = np.abs(ours - original).mean()
        check(error < 3.0, "%s: mean error %.2f from the photograph (wrong colours?)" % (name, error))


def test_other_formats(decoder, sources, scratch):
    image = Image.open(sources["odd"]).convert("RGB")
    files = {
        "png.JPEG": ("PNG", image),
        "rgba.png": ("PNG", image.convert("RGBA")),
        "grey.png": ("PNG", image.convert("L")),
        "image.bmp": ("BMP", image),
        "image.gif": ("GIF", image.convert("P", palette=Image.ADAPTIVE)),
        "image.ppm": ("PPM", image),
        "image.pgm": ("PPM", image.convert("L")),
        "image.tga": ("TGA", image),
    }
    for name, (format_name, content) in files.items():
        path = os.path.join(scratch, name)
        content.save(path, format=format_name)
        ours, note = decoder.decode(path)
        pil = np.asarray(Image.open(path).convert("RGB"))
        check(ours is not None and ours.shape == pil.shape and (ours == pil).all(),
              "%s: pixels differ from PIL's (%s)" % (name, note.strip()))


def test_warning_is_accepted(decoder, sources, scratch):
    path = os.path.join(scratch, "extraneous.jpg")
    cjpeg(sources["even"], path, [])
    data = open(path, "rb").read()
    scan = data.index(b"\xff\xda")
    with open(path, "wb") as file:
        file.write(data[:scan] + b"\x00\x11\x22" + data[scan:])  # libjpeg: "3 extraneous bytes before marker"
    ours, note = decoder.decode(path)
    check(ours is not None and "extraneous bytes" in note and (ours == djpeg(path)).all(),
          "JPEG with extraneous bytes: expected djpeg's pixels and the warning, got '%s'" % note.strip())


def test_bad_files(decoder, sources, scratch):
    jpeg = os.path.join(scratch, "whole.jpg")
    cjpeg(sources["even"], jpeg, ["-progressive"])
    data = open(jpeg, "rb").read()
    frame = data.index(b"\xff\xc2")
    bomb = bytearray(data)
    bomb[frame + 5:frame + 9] = (30000).to_bytes(2, "big") * 2
    cases = {
        "truncated.jpg": (data[:len(data) // 2], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"hello, not an image\n", "not a JPEG"),
        "bomb.jpg": (bytes(bomb), "over the limit"),
        "header-only.jpg": (data[:frame + 40], "JPEG"),
    }
    for name, (content, reason) in cases.items():
        path = os.path.join(scratch, name)
        with open(path, "wb") as file:
            file.write(content)
        ours, message = decoder.decode(path)
        check(ours is None and reason in message and path in message,
              "%s: expected a failure naming the path and '%s', got '%s'" % (name, reason, message.strip()))


def main():
    binary, scratch = sys.argv[1], sys.argv[2]
    os.makedirs(scratch, exist_ok=True)
    tool = os.path.join(os.path.dirname(os.path.abspath(binary)), "decode_image")
    if not os.path.exists(tool):
        print("FAIL: %s not built" % tool)
        return 1
    for program in ("cjpeg", "djpeg"):
        if run(["which", program]).returncode != 0:
            print("FAIL: %s not found: apt-get install libjpeg-turbo-progs" % program)
            return 1
    decoder = Decoder(tool, scratch)
    sources = make_sources(scratch)
    test_jpeg_variants(decoder, sources, scratch)
    test_scale_choice(decoder, sources, scratch)
    test_cmyk(decoder, sources, scratch)
    test_other_formats(decoder, sources, scratch)
    test_warning_is_accepted(decoder, sources, scratch)
    test_bad_files(decoder, sources, scratch)
    return exit_status("test_decode")


if __name__ == "__main__":
    sys.exit(main())
