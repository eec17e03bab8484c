"""Our image transforms (dataloader/image.h) against PIL 9.4 and torchvision 0.14 (Debian's
python3-pil and python3-torchvision), on a real photograph (tests/data/twowings_320x240.jpg).

Run by ctest as `/usr/bin/python3 tests/test_image_pil.py <tokenformer binary> <scratch dir>`. It
drives tests/tools/image_tool (built next to the tokenformer binary): the photograph is decoded by
PIL and handed over as PPM, so decoding is not compared. Checks:

- resize: PIL Image.resize(size, BICUBIC, box) for whole and fractional boxes, up and down, square
  and not: pixel-exact.
- resized crop: torchvision F.resized_crop (PIL crop then resize): pixel-exact.
- eval transform: torchvision Resize(int(size / crop_pct), BICUBIC) + CenterCrop(size): the
  geometry exactly on thousands of (w, h, size, crop_pct), the pixels exactly on the photograph.
- RandomResizedCrop: the rule of timm 0.3.2 RandomResizedCropAndInterpolation.get_params (below,
  with torchvision's 0 < w, h) fed the same uniform draws: identical boxes; and our generator's
  boxes have the rule's distribution.
- flip and CHW: exact.
- RandAugment: each of the 15 operations at several arguments (both signs, small and large, the
  extremes of m in [0, 10] and beyond) against timm 0.3.2's PIL calls (copied below; timm is not
  packaged in Debian), on the photograph and variants: pixel-exact; and timm's level-to-argument
  mapping on hundreds of magnitudes: bit-identical doubles.

Prints one line per comparison and exits 1 on any failure.
"""

import math
import os
import random
import sys

import numpy as np
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testlib import exit_status, report, run_program  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTO = os.path.join(HERE, "data", "twowings_320x240.jpg")
BICUBIC = Image.BICUBIC


def run_tool(*args, stdin=None):
    return run_program(TOOL, *args, stdin=stdin)


def save_ppm(image, name):
    path = os.path.join(SCRATCH, name)
    image.save(path)
    return path


def load(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def compare_images(name, ours_path, reference, tolerance=0):
    ours = load(ours_path)
    ref = np.asarray(reference, dtype=np.int16)
    if ours.shape != ref.shape:
        report(name, False, f"shape {ours.shape} != PIL {ref.shape}")
        return
    diff = np.abs(ours - ref)
    worst, count = int(diff.max()), int((diff > 0).sum())
    report(name, worst <= tolerance, f"max |diff| {worst} (allowed {tolerance}), {count} of {diff.size} values differ")


# ---- resize ----------------------------------------------------------------------------------------

def test_resize(images):
    cases = [  # image, (left, top, width, height), (out_w, out_h)
        ("photo", (0, 0, 320, 240), (224, 224)),
        ("photo", (0, 0, 320, 240), (500, 375)),
        ("photo", (0, 0, 320, 240), (37, 23)),
        ("photo", (0, 0, 320, 240), (160, 300)),
        ("photo", (10, 20, 190, 130), (224, 224)),
        ("photo", (10.3, 7.7, 200.25, 150.5), (224, 224)),
        ("photo", (0.5, 0.25, 319.5, 239.75), (97, 311)),
        ("photo", (100, 60, 12, 9), (224, 224)),
        ("photo", (3, 4, 224, 224), (224, 224)),
        ("odd", (0, 0, 317, 229), (224, 224)),
        ("odd", (1.125, 2.875, 300.5, 201.0625), (63, 129)),
        ("odd", (0, 0, 317, 229), (317, 1)),
        ("odd", (0, 0, 317, 229), (1, 229)),
        # the AVX-512 block form's edges: windows of 16 outputs just inside and just past 128 bytes
        # (downscales by 1.99 and 2.11), a block plus a tail at the images' right and bottom edges
        ("photo", (0, 0, 320, 240), (161, 17)),
        ("odd", (0, 0, 317, 229), (150, 229)),
        ("photo", (300, 0, 20, 240), (17, 240)),
    ]
    for source, box, size in cases:
        image, path = images[source]
        left, top, width, height = map(float, box)
        reference = image.resize(size, BICUBIC, box=(left, top, left + width, top + height))
        out = os.path.join(SCRATCH, "resize.ppm")
        run_tool("resize", path, out, *box, *size)
        compare_images(f"resize {source} box={box} -> {size}", out, reference)

    # A random sweep: boxes whole and fractional, scale factors from 1/60 to 40, either image.
    rng = random.Random(17)
    worst, differing = 0, 0
    for case in range(60):
        source = rng.choice(["photo", "odd"])
        image, path = images[source]
        width, height = image.size
        box_w, box_h = rng.uniform(1, width), rng.uniform(1, height)
        left, top = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
        if case % 2:
            box_w, box_h, left, top = max(1, round(box_w)), max(1, round(box_h)), int(left), int(top)
        size = (rng.randint(1, 400), rng.randint(1, 400))
        crop_first = case % 3 == 0 and case % 2 == 1
        out = os.path.join(SCRATCH, "sweep.ppm")
        if crop_first:
            reference = image.crop((left, top, left + box_w, top + box_h)).resize(size, BICUBIC)
            run_tool("resized_crop", path, out, left, top, box_w, box_h, *size)
        else:
            reference = image.resize(size, BICUBIC, box=(left, top, left + box_w, top + box_h))
            run_tool("resize", path, out, repr(left), repr(top), repr(box_w), repr(box_h), *size)
        diff = np.abs(load(out) - np.asarray(reference, dtype=np.int16))
        worst, differing = max(worst, int(diff.max())), differing + int(diff.max() > 0)
    report("resize / resized_crop random sweep (60 boxes and sizes)", worst == 0,
           f"max |diff| {worst} (allowed 0), {differing} of 60 cases differ")

    for source, box, size in [("photo", (0, 0, 320, 240), (224, 224)), ("photo", (17, 9, 150, 201), (224, 224)),
                              ("photo", (200, 100, 9, 13), (224, 224)), ("odd", (5, 3, 311, 100), (64, 200)),
                              ("odd", (0, 0, 317, 229), (317, 229))]:
        image, path = images[source]
        left, top, width, height = box
        reference = TF.resized_crop(image, top, left, height, width, [size[1], size[0]],
                                    T.InterpolationMode.BICUBIC)
        out = os.path.join(SCRATCH, "resized_crop.ppm")
        run_tool("resized_crop", path, out, *box, *size)
        compare_images(f"resized_crop {source} box={box} -> {size} (torchvision F.resized_crop)", out, reference)


# ---- eval geometry and pixels ---------------------------------------------------------------------------

def torchvision_eval_geometry(width, height, size, crop_pct):
    """What torchvision does: Resize(int(size / crop_pct)) then CenterCrop(size), with F.crop and
    F.pad intercepted to read the offsets (a crop larger than the image pads it first)."""
    short_target = int(size / crop_pct)
    new_h, new_w = TF._compute_resized_output_size((height, width), [short_target])
    seen = {"pad": (0, 0)}
    real_crop, real_pad = TF.crop, TF.pad

    def fake_crop(img, top, left, h, w):
        seen["crop"] = (left, top)
        return img

    def sized(w, h):  # a PIL image that only claims its size (1 x 448000 pixels would be slow)
        image = Image.new("L", (1, 1))
        image._size = (w, h)
        return image

    def fake_pad(img, padding, fill=0, padding_mode="constant"):
        seen["pad"] = (padding[0], padding[1])
        w, h = img.size
        return sized(w + padding[0] + padding[2], h + padding[1] + padding[3])

    TF.crop, TF.pad = fake_crop, fake_pad
    try:
        TF.center_crop(sized(new_w, new_h), size)
    finally:
        TF.crop, TF.pad = real_crop, real_pad
    left, top = seen.get("crop", (0, 0))
    return new_w, new_h, left - seen["pad"][0], top - seen["pad"][1]


def test_eval(images):
    rng = random.Random(7)
    queries = [(w, h, s, p) for (w, h) in [(500, 375), (375, 500), (333, 500), (257, 259), (224, 224), (256, 256),
                                           (1, 1000), (1000, 1), (299, 300), (513, 256)]
               for s in (224, 100, 64) for p in ("1.0", "0.875", "0.9", "0.95", "0.8", "0.7")]
    queries += [(rng.randint(1, 1200), rng.randint(1, 1200), rng.choice([224, 192, 160, 96, 32, 7]),
                 rng.choice(["1.0", "0.875", "0.9", "0.95", "0.8", "0.7", "0.5", "0.6", "0.85", "0.96", "1.1"]))
                for _ in range(3000)]
    stdin = "".join(f"{w} {h} {s} {p}\n" for w, h, s, p in queries)
    ours = [tuple(map(int, line.split())) for line in run_tool("eval_geometry", stdin=stdin).splitlines()]
    expected = [torchvision_eval_geometry(w, h, s, float(p)) for w, h, s, p in queries]
    bad = [(q, o, e) for q, o, e in zip(queries, ours, expected) if o != e]
    report("eval geometry vs torchvision Resize + CenterCrop", len(ours) == len(queries) and not bad,
           f"{len(queries)} (w, h, size, crop_pct) cases, {len(bad)} differ" + (f", first {bad[0]}" if bad else ""))

    for source in ("photo", "odd"):
        image, path = images[source]
        for size, crop_pct in [(224, "0.875"), (224, "1.0"), (100, "0.9"), (64, "0.8"), (200, "0.7")]:
            transform = T.Compose([T.Resize(int(size / float(crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
                                   T.CenterCrop(size)])
            out = os.path.join(SCRATCH, "eval.ppm")
            run_tool("eval", path, out, size, crop_pct)
            compare_images(f"eval transform {source} size {size} crop_pct {crop_pct}", out, transform(image))


# ---- RandomResizedCrop ----------------------------------------------------------------------------------

def timm_rrc_params(width, height, scale, ratio, uniform, randint):
    """timm 0.3.2 RandomResizedCropAndInterpolation.get_params, random.* passed in; plus torchvision's
    0 < w and 0 < h."""
    area = width * height
    for _ in range(10):
        target_area = uniform(*scale) * area
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = randint(0, height - h)
            j = randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def rrc_from_draws(width, height, scale, ratio, draws):
    """The rule fed a list of uniforms the way image_random_resized_crop_box_from_draws reads it."""
    queue = list(draws)

    def next_draw():
        return queue.pop(0) if queue else 0.0

    def uniform(a, b):
        return a + (b - a) * next_draw()

    def randint(a, b):
        return a + min(b - a, int(math.floor(next_draw() * (b - a + 1))))

    i, j, h, w = timm_rrc_params(width, height, scale, ratio, uniform, randint)
    return j, i, w, h


def float32_decimal(value):
    """The double our C code reads a config float as: the shortest decimal of the float32."""
    f = np.float32(value)
    for digits in range(1, 10):
        text = f"{f:.{digits}g}"
        if np.float32(text) == f:
            return float(text)
    return float(f)


def test_rrc():
    rng = random.Random(11)
    lines, expected = [], []
    settings = [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.5, 2.0)), ((0.9, 1.0), (3 / 4, 4 / 3)),
                ((0.08, 0.3), (1.0, 1.0))]
    for case in range(4000):
        scale, ratio = settings[case % len(settings)]
        width, height = rng.choice([(500, 375), (375, 500), (1000, 50), (50, 1000), (7, 5), (1, 1), (2, 3)]
                                   + [(rng.randint(1, 800), rng.randint(1, 800))] * 3)
        draws = [rng.random() for _ in range(rng.choice([4, 8, 20, 22, 24]))]
        lines.append(" ".join(map(repr, [width, height, *scale, *ratio, *draws])))
        c_scale = tuple(float32_decimal(v) for v in scale)
        c_ratio = tuple(float32_decimal(v) for v in ratio)
        expected.append(rrc_from_draws(width, height, c_scale, c_ratio, draws))
    ours = [tuple(map(int, line.split())) for line in run_tool("rrc", stdin="\n".join(lines) + "\n").splitlines()]
    bad = [(line, o, e) for line, o, e in zip(lines, ours, expected) if o != e]
    report("RandomResizedCrop rule vs timm get_params on the same draws", len(ours) == len(lines) and not bad,
           f"{len(lines)} cases, {len(bad)} differ" + (f", first {bad[0]}" if bad else ""))

    # Distribution of our generator's boxes against the rule driven by Python's generator.
    width, height, count = 500, 375, 40000
    ours = np.array([list(map(int, line.split()))
                     for line in run_tool("rrc_sample", width, height, count, 5).splitlines()], dtype=np.float64)
    python_rng = random.Random(5)
    ref = np.array([rrc_from_draws(width, height, (0.08, 1.0), (float32_decimal(0.75), float32_decimal(4 / 3)),
                                   [python_rng.random() for _ in range(24)]) for _ in range(count)], dtype=np.float64)

    def stats(boxes):
        area = boxes[:, 2] * boxes[:, 3] / (width * height)
        log_aspect = np.log(boxes[:, 2] / boxes[:, 3])
        slack_x, slack_y = width - boxes[:, 2], height - boxes[:, 3]
        pos_x = np.mean(boxes[slack_x > 0, 0] / slack_x[slack_x > 0])
        pos_y = np.mean(boxes[slack_y > 0, 1] / slack_y[slack_y > 0])
        return np.array([area.mean(), area.std(), log_aspect.mean(), log_aspect.std(), pos_x, pos_y])

    ours_stats, ref_stats = stats(ours), stats(ref)
    inside = bool(np.all((ours[:, 0] >= 0) & (ours[:, 1] >= 0) & (ours[:, 0] + ours[:, 2] <= width)
                         & (ours[:, 1] + ours[:, 3] <= height)))
    close = bool(np.all(np.abs(ours_stats - ref_stats) < [0.01, 0.01, 0.01, 0.01, 0.01, 0.01]))
    report("RandomResizedCrop distribution (area mean/std, log-ratio mean/std, position)", inside and close,
           f"ours {np.round(ours_stats, 4).tolist()} vs rule {np.round(ref_stats, 4).tolist()}, all inside {inside}")


# ---- flip and CHW -------------------------------------------------------------------------------------

def test_flip_chw(images):
    for source in ("photo", "odd"):
        image, path = images[source]
        out = os.path.join(SCRATCH, "flip.ppm")
        run_tool("flip", path, out)
        compare_images(f"flip {source} vs PIL FLIP_LEFT_RIGHT", out, image.transpose(Image.FLIP_LEFT_RIGHT))
        raw = os.path.join(SCRATCH, "chw.raw")
        run_tool("chw", path, raw)
        ours = np.fromfile(raw, dtype=np.uint8)
        ref = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)).reshape(-1)
        report(f"to_chw {source}", ours.shape == ref.shape and np.array_equal(ours, ref), "R, G, B planes")


# ---- RandAugment ---------------------------------------------------------------------------------------
# timm 0.3.2 timm/data/auto_augment.py, the parts MAE's rand-m9-mstd0.5-inc1 uses (timm is not in
# Debian): the PIL call of each operation and the level-to-argument functions.

FILL = (124, 116, 104)  # MAE's hparams img_mean: round(255 * ImageNet mean)
AFFINE_KWARGS = dict(fillcolor=FILL, resample=BICUBIC)


def timm_op(name, img, arg):
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **AFFINE_KWARGS)
    if name == "PosterizeIncreasing":
        return img if arg >= 8 else ImageOps.posterize(img, int(arg))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut + lut + lut)
    if name == "ColorIncreasing":
        return ImageEnhance.Color(img).enhance(arg)
    if name == "ContrastIncreasing":
        return ImageEnhance.Contrast(img).enhance(arg)
    if name == "BrightnessIncreasing":
        return ImageEnhance.Brightness(img).enhance(arg)
    if name == "SharpnessIncreasing":
        return ImageEnhance.Sharpness(img).enhance(arg)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, arg, 0, 0, 1, 0), **AFFINE_KWARGS)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, arg, 1, 0), **AFFINE_KWARGS)
    if name == "TranslateXRel":  # translate_x_rel after pixels = pct * img.size[0]
        return img.transform(img.size, Image.AFFINE, (1, 0, arg, 0, 1, 0), **AFFINE_KWARGS)
    if name == "TranslateYRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, arg), **AFFINE_KWARGS)
    raise ValueError(name)


def timm_argument(name, magnitude, negate, width, height):
    """timm's _*_level_to_arg for the increasing set, _randomly_negate replaced by the given draw."""
    sign = (lambda v: -v) if negate else (lambda v: v)
    level = magnitude
    if name == "Rotate":
        return sign((level / 10.) * 30.)
    if name == "PosterizeIncreasing":
        return 4 - int((level / 10.) * 4)
    if name == "SolarizeIncreasing":
        return 256 - int((level / 10.) * 256)
    if name == "SolarizeAdd":
        return int((level / 10.) * 110)
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
        return 1.0 + sign((level / 10.) * .9)
    if name in ("ShearX", "ShearY"):
        return sign((level / 10.) * 0.3)
    if name == "TranslateXRel":
        return sign((level / 10.) * 0.45) * width
    if name == "TranslateYRel":
        return sign((level / 10.) * 0.45) * height
    return 0.0


OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel"]

ENHANCE = [0.0, 0.1, 0.19, 0.55, 0.9, 1.0, 1.1, 1.45, 1.81, 1.9, 2.5]
OP_ARGUMENTS = {
    "AutoContrast": [0], "Equalize": [0], "Invert": [0],
    "Rotate": [0.0, 1.5, -1.5, 13.5, -13.5, 27.0, -27.0, 30.0, -30.0, 29.87, -0.0001, 90.0, 180.0, 359.9, -270.0],
    "PosterizeIncreasing": [0, 1, 2, 3, 4, 7, 8],
    "SolarizeIncreasing": [0, 1, 26, 128, 205, 255, 256],
    "SolarizeAdd": [0, 11, 55, 99, 110],
    "ColorIncreasing": ENHANCE, "ContrastIncreasing": ENHANCE, "BrightnessIncreasing": ENHANCE,
    "SharpnessIncreasing": ENHANCE,
    "ShearX": [0.03, -0.03, 0.15, -0.15, 0.27, -0.27, 0.3, -0.3, 0.0],
    "ShearY": [0.03, -0.03, 0.15, -0.15, 0.27, -0.27, 0.3, -0.3],
    "TranslateXRel": [0.045, -0.045, 0.2, -0.2, 0.405, -0.405, 0.45, -0.45, 0.0, 0.5 / 320],
    "TranslateYRel": [0.045, -0.045, 0.2, -0.2, 0.405, -0.405, 0.45, -0.45, 1.0 / 240],
}


def test_ops(images):
    # Inputs: the photograph, an odd-sized crop, a low-contrast version (so autocontrast and equalize
    # have work to do), a square crop (90 degrees), and a tiny image (equalize's small steps).
    photo, _ = images["photo"]
    low = photo.point(lambda v: 60 + v * 120 // 255)
    square = photo.crop((40, 10, 40 + 211, 10 + 211))
    tiny = photo.resize((9, 7), BICUBIC)
    inputs = {"photo": photo, "odd": images["odd"][0], "low": low, "square": square, "tiny": tiny}
    paths = {name: save_ppm(image, f"op_{name}.ppm") for name, image in inputs.items()}
    out = os.path.join(SCRATCH, "op.ppm")
    for name in OPS:
        for arg in OP_ARGUMENTS[name]:
            sources = ["photo", "odd"] + (["low", "tiny"] if arg == 0 else []) + (["square"] if arg == 90.0 else [])
            for source in sources:
                image = inputs[source]
                value = arg * image.size[0] if name == "TranslateXRel" else \
                    arg * image.size[1] if name == "TranslateYRel" else arg
                run_tool("op", paths[source], out, name, repr(value))
                compare_images(f"{name}({value:.6g}) {source}", out, timm_op(name, image, value))

    # A random sweep of the arguments the policy produces: m ~ N(9, 0.5) clipped, random signs.
    rng = random.Random(23)
    worst, differing = 0, 0
    for case in range(60):
        name = OPS[case % len(OPS)]
        source = rng.choice(["photo", "odd"])
        image = inputs[source]
        value = timm_argument(name, min(10.0, max(0.0, rng.gauss(9, 0.5))), rng.random() > 0.5, *image.size)
        run_tool("op", paths[source], out, name, repr(value))
        diff = np.abs(load(out) - np.asarray(timm_op(name, image, value), dtype=np.int16))
        worst, differing = max(worst, int(diff.max())), differing + int(diff.max() > 0)
    report("RandAugment operations random sweep (60 draws of m9-mstd0.5)", worst == 0,
           f"max |diff| {worst} (allowed 0), {differing} of 60 cases differ")

    # Level to argument: magnitudes across [0, 10], including those where int() steps.
    rng = random.Random(3)
    magnitudes = [0.0, 10.0, 2.5, 5.0, 7.5, 9.0, 1.25, 3.75, 8.75, 0.1, 9.999] + [rng.uniform(0, 10) for _ in range(300)]
    queries = [(name, m, negate, w, h) for name in OPS for m in magnitudes for negate in (0, 1)
               for (w, h) in [(224, 224), (320, 240)]]
    stdin = "".join(f"{n} {m!r} 1 {neg} {w} {h}\n" for n, m, neg, w, h in queries)
    ours = [float(v) for v in run_tool("argument", stdin=stdin).split()]
    bad = [(q, o, timm_argument(*q)) for q, o in zip(queries, ours) if o != timm_argument(*q)]
    report("RandAugment level-to-argument vs timm (increasing set)", len(ours) == len(queries) and not bad,
           f"{len(queries)} (op, magnitude, sign, size) cases, {len(bad)} differ" + (f", first {bad[0]}" if bad else ""))


def main():
    global TOOL, SCRATCH
    if len(sys.argv) < 3:
        print("usage: test_image_pil.py <tokenformer binary> <scratch dir>")
        return 2
    TOOL = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "image_tool")
    SCRATCH = sys.argv[2]
    os.makedirs(SCRATCH, exist_ok=True)
    if not os.path.exists(TOOL):
        print(f"FAIL: {TOOL} is missing (build the image_tool target)")
        return 1
    photo = Image.open(PHOTO).convert("RGB")
    odd = photo.crop((3, 5, 3 + 317, 5 + 229))  # odd sizes: half-pixel centres, uneven crops
    images = {"photo": (photo, save_ppm(photo, "photo.ppm")), "odd": (odd, save_ppm(odd, "odd.ppm"))}

    test_resize(images)
    test_eval(images)
    test_rrc()
    test_flip_chw(images)
    test_ops(images)

    return exit_status("test_image_pil")


if __name__ == "__main__":
    sys.exit(main())
