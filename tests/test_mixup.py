"""Our batch-mode Mixup/CutMix (train/mixup.c, the CPU backend's mixup_images and cutmix_images)
against timm 0.3.2's timm/data/mixup.py, written below with Debian's python3-torch (timm is not
packaged in Debian).

Run by ctest as `/usr/bin/python3 tests/test_mixup.py <tokenformer binary> <scratch dir>`. It drives
tests/tools/mixup_tool (built next to the tokenformer binary). Checks:

- apply: for the (lambda, cutmix, box) that mixup_draw draws, the mixed images and the soft targets
  equal timm's _mix_batch and mixup_target applied with the same lambda and box (cutmix exactly,
  mixup and targets within 1e-6), for even and odd batches, mixed and unmixed steps.
- box rule: for given (lambda, size, cy, cx) the box and the corrected lambda equal timm's
  rand_bbox and cutmix_bbox_and_lam (the corrected lambda as the same float32).
- statistics over many draws: with mixup 0.8 / cutmix 1.0 / switch 0.5 / prob 1.0 half the batches
  are cutmix; the mixup lambdas have the mean and variance of Beta(alpha, alpha); the corrected
  cutmix lambdas have the mean and variance of timm's procedure (simulated with numpy); prob 0.5
  leaves half the batches unmixed (lambda exactly 1); mixup 0 and cutmix 0 never mix.

Prints one line per comparison and exits 1 on any failure.
"""

import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testlib import exit_status, report, run_program  # noqa: E402


def run_tool(*args, stdin=None):
    return run_program(TOOL, *args, stdin=stdin)


def parse_mix(line):
    fields = line.split()
    return float(fields[0]), fields[1] == "1", tuple(int(v) for v in fields[2:6])


# ---- timm 0.3.2, timm/data/mixup.py (batch mode, margin 0, correct_lam, no cutmix_minmax) ---------

def one_hot(x, num_classes, on_value=1., off_value=0.):
    x = x.long().view(-1, 1)
    return torch.full((x.size()[0], num_classes), off_value).scatter_(1, x, on_value)


def mixup_target(target, num_classes, lam=1., smoothing=0.0):
    off_value = smoothing / num_classes
    on_value = 1. - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value=on_value, off_value=off_value)
    y2 = one_hot(target.flip(0), num_classes, on_value=on_value, off_value=off_value)
    return y1 * lam + y2 * (1. - lam)


def rand_bbox_at(img_shape, lam, cy, cx):
    """rand_bbox with the centre given instead of drawn by np.random.randint."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + cut_h // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def cutmix_bbox_and_lam(img_shape, lam, cy, cx):
    yl, yu, xl, xu = rand_bbox_at(img_shape, lam, cy, cx)
    bbox_area = (yu - yl) * (xu - xl)
    lam = 1. - bbox_area / float(img_shape[-2] * img_shape[-1])
    return (yl, yu, xl, xu), lam


def mix_batch(x, lam, use_cutmix, box):
    """Mixup._mix_batch after the draw: the box and lambda are given."""
    if lam == 1. and not use_cutmix:
        return
    if use_cutmix:
        yl, yh, xl, xh = box
        x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    else:
        x_flipped = x.flip(0).mul_(1. - lam)
        x.mul_(lam).add_(x_flipped)


# ---- (a) images and targets -------------------------------------------------------------------

SETTINGS = {"mixup": 0.8, "cutmix": 1.0, "switch": 0.5, "prob": 1.0}


def settings_args(settings):
    return [f"{key}={value}" for key, value in settings.items()]


def check_apply_step(step, batch, settings, kinds):
    channels, size, classes, smoothing = 3, 16, 10, 0.1
    generator = np.random.default_rng(1000 + step)
    images = generator.standard_normal((batch, channels, size, size)).astype(np.float32)
    labels = generator.integers(0, classes, batch)
    paths = {name: os.path.join(SCRATCH, f"{name}_{step}.f32") for name in ("in", "images", "targets")}
    images.tofile(paths["in"])
    output = run_tool("apply", "seed=7", f"step={step}", *settings_args(settings), f"smoothing={smoothing}",
                      f"classes={classes}", "labels=" + ",".join(map(str, labels)), f"channels={channels}",
                      f"size={size}", f"in={paths['in']}", f"images={paths['images']}",
                      f"targets={paths['targets']}")
    lam, cutmix, box = parse_mix(output)
    ours = torch.from_numpy(np.fromfile(paths["images"], np.float32).reshape(images.shape))
    our_targets = torch.from_numpy(np.fromfile(paths["targets"], np.float32).reshape(batch, classes))

    reference = torch.from_numpy(images.copy())
    mix_batch(reference, lam, cutmix, box)
    reference_targets = mixup_target(torch.from_numpy(labels), classes, lam, smoothing)
    kind = "cutmix" if cutmix else "mixup" if lam != 1.0 else "none"
    kinds.add(kind)
    name = f"apply step {step} batch {batch} ({kind}, lambda {lam:.6f}, box {box})"
    if cutmix:
        image_ok = torch.equal(ours, reference)
        area = (box[1] - box[0]) * (box[3] - box[2])
        lambda_ok = np.float32(lam) == np.float32(1. - area / float(size * size))
        image_detail = f"images {'identical' if image_ok else 'differ'}, lambda = 1 - box area / image area: {lambda_ok}"
        image_ok = image_ok and lambda_ok
    else:
        image_error = (ours - reference).abs().max().item()
        image_ok = image_error <= 1e-6
        image_detail = f"images max |diff| {image_error:.2e}"
    target_error = (our_targets - reference_targets).abs().max().item()
    report(name, image_ok and target_error <= 1e-6, f"{image_detail}, targets max |diff| {target_error:.2e}")


def check_apply():
    kinds = set()
    for step in range(24):
        settings = dict(SETTINGS, prob=0.7)
        check_apply_step(step, 6 if step % 2 == 0 else 7, settings, kinds)
    report("apply covers cutmix, mixup and unmixed steps", kinds == {"cutmix", "mixup", "none"},
           f"saw {sorted(kinds)}")


# ---- (b) the box rule -------------------------------------------------------------------------

def check_box_rule():
    generator = np.random.default_rng(5)
    cases = []
    for size in (1, 2, 15, 16, 32, 224):
        for lam in (0.0, 1.0, 0.5, 0.75, 1e-9, 1 - 1e-9):
            for cy, cx in ((0, 0), (size - 1, size - 1), (0, size - 1), (size // 2, size // 2)):
                cases.append((lam, size, cy, cx))
        # lambdas whose side size * sqrt(1 - lambda) is a whole number, or just either side of one
        for cut in range(size + 1):
            lam = 1.0 - (cut / size) ** 2
            for value in (lam, np.nextafter(lam, 0.0), np.nextafter(lam, 1.0)):
                cases.append((float(value), size, int(generator.integers(size)), int(generator.integers(size))))
        for _ in range(300):
            cases.append((float(generator.random()), size, int(generator.integers(size)),
                          int(generator.integers(size))))
    stdin = "".join(f"{lam!r} {size} {cy} {cx}\n" for lam, size, cy, cx in cases)
    lines = run_tool("box", stdin=stdin).splitlines()
    mismatches = []
    for (lam, size, cy, cx), line in zip(cases, lines):
        fields = line.split()
        ours_lam, ours_box = np.float32(fields[0]), tuple(int(v) for v in fields[1:])
        box, reference_lam = cutmix_bbox_and_lam((size, size), lam, cy, cx)
        if ours_box != tuple(int(v) for v in box) or ours_lam != np.float32(reference_lam):
            mismatches.append(f"lambda {lam!r} size {size} centre ({cy}, {cx}): ours {line}, timm {box} "
                              f"{reference_lam!r}")
    ok = len(lines) == len(cases) and not mismatches
    report("box rule (rand_bbox, cutmix_bbox_and_lam)", ok,
           f"{len(cases)} cases, {len(mismatches)} mismatches" + (f"; first: {mismatches[0]}" if mismatches else ""))


# ---- (c) statistics ---------------------------------------------------------------------------

def draws(settings, count, size=224, seed=11):
    output = run_tool("draw", f"seed={seed}", "step=0", f"count={count}", f"size={size}", *settings_args(settings))
    rows = [parse_mix(line) for line in output.splitlines()]
    if len(rows) != count:
        raise RuntimeError(f"mixup_tool draw printed {len(rows)} lines, expected {count}")
    return rows


def check_fraction(name, hits, count, p):
    sigma = math.sqrt(p * (1 - p) / count)
    share = hits / count
    report(name, abs(share - p) <= 5 * sigma, f"{hits}/{count} = {share:.4f}, expected {p} +- {5 * sigma:.4f}")


def check_moments(name, values, mean, variance, fourth_moment):
    """Sample mean and variance against the distribution's, within 5 standard errors."""
    n = len(values)
    values = np.asarray(values, np.float64)
    mean_error = 5 * math.sqrt(variance / n)
    variance_error = 5 * math.sqrt((fourth_moment - variance ** 2) / n)
    sample_mean, sample_variance = values.mean(), values.var()
    ok = abs(sample_mean - mean) <= mean_error and abs(sample_variance - variance) <= variance_error
    report(name, ok, f"n {n}: mean {sample_mean:.4f} (expected {mean:.4f} +- {mean_error:.4f}), "
                     f"variance {sample_variance:.4f} (expected {variance:.4f} +- {variance_error:.4f})")


def check_beta(name, lambdas, alpha):
    """Beta(alpha, alpha): mean 1/2, variance 1 / (4 (2 alpha + 1)), excess kurtosis -6 / (2 alpha + 3)."""
    variance = 1.0 / (4.0 * (2.0 * alpha + 1.0))
    fourth_moment = variance ** 2 * (3.0 - 6.0 / (2.0 * alpha + 3.0))
    check_moments(name, lambdas, 0.5, variance, fourth_moment)


def timm_cutmix_lambdas(alpha, size, count):
    """cutmix_bbox_and_lam's corrected lambdas for Beta(alpha, alpha) draws and uniform centres."""
    generator = np.random.default_rng(3)
    lam = generator.beta(alpha, alpha, count)
    cut = (size * np.sqrt(1 - lam)).astype(np.int64)
    cy, cx = generator.integers(0, size, count), generator.integers(0, size, count)
    height = np.clip(cy + cut // 2, 0, size) - np.clip(cy - cut // 2, 0, size)
    width = np.clip(cx + cut // 2, 0, size) - np.clip(cx - cut // 2, 0, size)
    return 1. - height * width / float(size * size)


def check_recipe_statistics():
    count, size = 40000, 224
    rows = draws(SETTINGS, count, size)
    cutmix = [row for row in rows if row[1]]
    mixup = [row[0] for row in rows if not row[1]]
    check_fraction("recipe: share of cutmix batches (switch 0.5)", len(cutmix), count, 0.5)
    report("recipe: every batch mixed (prob 1.0)", all(lam != 1.0 for lam in mixup), f"{len(mixup)} mixup batches")
    check_beta("recipe: mixup lambda ~ Beta(0.8, 0.8)", mixup, 0.8)
    consistent = all(np.float32(lam) == np.float32(1. - (y1 - y0) * (x1 - x0) / float(size * size))
                     and 0 <= y0 <= y1 <= size and 0 <= x0 <= x1 <= size
                     for lam, _, (y0, y1, x0, x1) in cutmix)
    report("recipe: cutmix lambda = 1 - box area / image area", consistent, f"{len(cutmix)} cutmix batches")
    reference = timm_cutmix_lambdas(1.0, size, 1000000)
    centred = reference - reference.mean()
    check_moments("recipe: corrected cutmix lambda like timm's (Beta(1, 1), uniform centre)",
                  [row[0] for row in cutmix], reference.mean(), reference.var(), float((centred ** 4).mean()))


def check_other_settings():
    count = 20000
    rows = draws(dict(SETTINGS, prob=0.5), count, seed=12)
    unmixed = sum(1 for lam, cutmix, _ in rows if lam == 1.0 and not cutmix)
    check_fraction("prob 0.5: share of unmixed batches (lambda exactly 1)", unmixed, count, 0.5)
    for alpha in (0.2, 0.8, 2.0):
        rows = draws({"mixup": alpha, "cutmix": 0.0, "switch": 0.5, "prob": 1.0}, count, seed=13)
        report(f"mixup only (alpha {alpha}): never cutmix", not any(row[1] for row in rows), f"{count} draws")
        check_beta(f"mixup only: lambda ~ Beta({alpha}, {alpha})", [row[0] for row in rows], alpha)
    rows = draws({"mixup": 0.0, "cutmix": 1.0, "switch": 0.5, "prob": 1.0}, count, seed=14)
    report("cutmix only: always cutmix", all(row[1] for row in rows), f"{count} draws")
    rows = draws({"mixup": 0.0, "cutmix": 0.0, "switch": 0.5, "prob": 1.0}, 2000, seed=15)
    never = all(lam == 1.0 and not cutmix and box == (0, 0, 0, 0) for lam, cutmix, box in rows)
    report("mixup 0 and cutmix 0: never mixed", never, "2000 draws")


def main():
    global TOOL, SCRATCH
    binary, SCRATCH = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    TOOL = os.path.join(os.path.dirname(binary), "mixup_tool")
    os.makedirs(SCRATCH, exist_ok=True)
    torch.set_num_threads(1)
    check_apply()
    check_box_rule()
    check_recipe_statistics()
    check_other_settings()
    return exit_status("test_mixup")


if __name__ == "__main__":
    sys.exit(main())
