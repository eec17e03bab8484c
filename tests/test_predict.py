"""`tokenformer predict` against PIL, torchvision and the independent PyTorch model.

Run by ctest as `/usr/bin/python3 tests/test_predict.py <tokenformer binary> <scratch dir>`. It trains
the small model of tests/test_eval.py (whose helpers it uses) and predicts on a few images of several
kinds: Fashion-MNIST JPEGs (28x28 grayscale), a 320x240 photograph, RGB and grayscale PNGs of odd
sizes, a portrait, and a JPEG named .png (decoded by content). Checks:
- --dump-input equals torchvision's eval transform of the PIL image within 1e-5 (the uint8 pixels
  are exactly PIL's, so only the float normalisation can differ), with the checkpoint's crop_pct
  and with --crop-pct 0.875, and its .npy file is what numpy writes (version 1.0, 64-byte header);
- --dump-logits equals the float64 reference's logits within 1e-4 relative, and batches of 2 give
  the logits of one batch of all;
- --json parses; per image the top-1 class is the reference's, the probabilities (--topk 10) sum to
  1 and equal the reference's softmax; --topk larger than the class count lists every class once;
- the plain text lists each image with its top-k classes;
- an unreadable image (missing, not an image, truncated) is an error naming it, with nothing on
  stdout and no .npy left behind; a checkpoint of another shape and usage errors are refused.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_eval import (REPO, TIE, bad_checkpoints, checkpoint_crop_pct, prepare_and_train, ref,  # noqa: E402
                       reference_inputs, reference_logits, run)
from testlib import check, exit_status  # noqa: E402

PHOTO = os.path.join(REPO, "tests/data/twowings_320x240.jpg")


def make_images(data, scratch):
    """A few images of different kinds; returns their paths."""
    val = os.path.join(data, "val")
    paths = [os.path.join(val, name, sorted(os.listdir(os.path.join(val, name)))[0])
             for name in sorted(os.listdir(val))[:4]]
    paths.append(PHOTO)
    with Image.open(PHOTO) as photo:
        photo = photo.convert("RGB")
        photo.crop((100, 50, 145, 87)).save(os.path.join(scratch, "rgb_45x37.png"))
        photo.crop((10, 10, 40, 60)).convert("L").save(os.path.join(scratch, "gray_portrait_30x50.png"))
        photo.crop((0, 0, 200, 120)).save(os.path.join(scratch, "jpeg_named.png"), format="JPEG", quality=90)
    paths += [os.path.join(scratch, name) for name in ("rgb_45x37.png", "gray_portrait_30x50.png", "jpeg_named.png")]
    return paths


def predict(binary, checkpoint, paths, *options, expect=0):
    return run([binary, "predict", "--ckpt", checkpoint, "--device", "cpu"] + list(options) + paths, expect=expect)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def check_npy_header(path):
    with open(path, "rb") as handle:
        head = handle.read(10)
        length = int.from_bytes(head[8:10], "little")
        header = handle.read(length)
    check(head[:8] == b"\x93NUMPY\x01\x00" and (10 + length) % 64 == 0 and header.endswith(b"\n"),
          f"{os.path.basename(path)}: .npy version 1.0, header padded to a multiple of 64")


def test_against_reference(binary, scratch, checkpoint, paths, crop_pct, options, what):
    print(what)
    config, params, _ = ref.load_checkpoint(checkpoint)
    inputs_path, logits_path = os.path.join(scratch, "input.npy"), os.path.join(scratch, "logits.npy")
    result = predict(binary, checkpoint, paths, "--json", "--topk", "10", "--dump-input", inputs_path,
                     "--dump-logits", logits_path, *options)
    check(result.returncode == 0, f"{what}: predict exits 0")
    if result.returncode != 0:
        return
    expected_inputs = reference_inputs(paths, config.img_size, crop_pct).numpy()
    inputs = np.load(inputs_path)
    check(inputs.dtype == np.float32 and inputs.shape == expected_inputs.shape and inputs.flags.c_contiguous,
          f"{what}: --dump-input is float32 {list(inputs.shape)}")
    check_npy_header(inputs_path)
    error = np.abs(inputs - expected_inputs).max()
    check(error <= 1e-5, f"{what}: --dump-input equals torchvision's eval transform (max error {error:.1e})")

    expected_logits = reference_logits(config, params, torch.from_numpy(expected_inputs))
    logits = np.load(logits_path)
    check(logits.dtype == np.float32 and logits.shape == (len(paths), config.classes),
          f"{what}: --dump-logits is float32 {list(logits.shape)}")
    error = np.abs(logits - expected_logits).max() / max(1.0, np.abs(expected_logits).max())
    check(error < 1e-4, f"{what}: --dump-logits equals the reference's logits ({error:.1e} relative)")

    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError as problem:
        check(False, f"{what}: --json output parses ({problem})")
        return
    check(isinstance(report, list) and [entry["image"] for entry in report] == paths,
          f"{what}: --json is an array with one entry per image, in order")
    probabilities = softmax(expected_logits)
    names = json.loads(ref.read_safetensors(checkpoint)[1]["class_names"])
    for i, entry in enumerate(report):
        predictions = entry["predictions"]
        best = int(expected_logits[i].argmax())
        runner_up = int(np.argsort(expected_logits[i])[-2])
        tie = abs(expected_logits[i, best] - expected_logits[i, runner_up]) < TIE
        top = predictions[0]["index"]
        check(top == best or (tie and top == runner_up),
              f"{what}: {os.path.basename(paths[i])}: top-1 '{predictions[0]['class']}' is the reference's "
              f"'{names[best]}'")
        total = sum(p["probability"] for p in predictions)
        close = all(abs(p["probability"] - probabilities[i, p["index"]]) < 1e-5 and p["class"] == names[p["index"]]
                    for p in predictions)
        ordered = all(a["probability"] >= b["probability"] for a, b in zip(predictions, predictions[1:]))
        check(len(predictions) == 10 and abs(total - 1.0) < 1e-9 and close and ordered,
              f"{what}: {os.path.basename(paths[i])}: 10 probabilities, best first, sum {total:.12f}, "
              f"equal to the reference's softmax")


def test_batches_and_text(binary, scratch, checkpoint, paths):
    print("batches, --topk and text output")
    whole, pieces = os.path.join(scratch, "whole.npy"), os.path.join(scratch, "pieces.npy")
    predict(binary, checkpoint, paths, "--dump-logits", whole)
    result = predict(binary, checkpoint, paths, "--batch", "2", "--dump-logits", pieces)
    check(result.returncode == 0 and np.abs(np.load(whole) - np.load(pieces)).max() < 1e-5,
          "batches of 2 give the logits of one batch of all")
    result = predict(binary, checkpoint, paths[:2], "--json", "--topk", "50")
    report = json.loads(result.stdout) if result.returncode == 0 else []
    check(len(report) == 2 and all(sorted(p["index"] for p in entry["predictions"]) == list(range(10))
                                   for entry in report), "--topk 50 lists each of the 10 classes once")
    result = predict(binary, checkpoint, paths[:3], "--topk", "3")
    lines = result.stdout.splitlines()
    check(result.returncode == 0 and len(lines) == 3 * 4 and all(lines[4 * i] == paths[i] for i in range(3))
          and all("%" in line for i, line in enumerate(lines) if i % 4),
          "text output: each image's path, then its 3 classes with percentages")


def test_refusals(binary, scratch, checkpoint, paths):
    print("refusals")

    def refused(arguments, words, what, code=1, images=None):
        dump = os.path.join(scratch, "refused.npy")
        result = predict(binary, checkpoint, images if images is not None else paths, "--dump-input", dump,
                         *arguments, expect=None)
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        check(result.returncode == code and all(w in message for w in words) and not result.stdout
              and not os.path.exists(dump), f"{what}: exit {result.returncode}, '{message[:160]}'")

    missing = os.path.join(scratch, "missing.jpg")
    refused([], [missing, "No such file"], "a missing image", images=paths + [missing])
    not_image = os.path.join(scratch, "notes.jpg")
    with open(not_image, "w") as handle:
        handle.write("not an image\n")
    refused([], [not_image], "a file that is not an image", images=paths[:1] + [not_image] + paths[1:])
    truncated = os.path.join(scratch, "truncated.jpg")
    with open(PHOTO, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read()[:2000])
    refused([], [truncated], "a truncated JPEG", images=[truncated])
    for path, words, what in bad_checkpoints(checkpoint, scratch):
        result = predict(binary, path, paths[:1], expect=None)
        check(result.returncode == 1 and path in result.stderr and all(w in result.stderr for w in words),
              f"predict refuses {what}: exit {result.returncode}")
    refused(["--topk", "0"], ["--topk"], "--topk 0", 2)
    refused(["--crop-pct", "0"], ["--crop-pct"], "--crop-pct 0", 2)
    refused(["--device", "tpu"], ["--device"], "--device tpu", 2)
    refused([], ["no images"], "no images", 2, images=[])


def main():
    binary, scratch = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    prepared = prepare_and_train(binary, scratch)
    if prepared is None:
        return 1
    data, run_dir = prepared
    checkpoint = os.path.join(run_dir, "model.safetensors")
    paths = make_images(data, scratch)
    own_crop = checkpoint_crop_pct(ref.read_safetensors(checkpoint)[1])
    test_against_reference(binary, scratch, checkpoint, paths, own_crop, [],
                           f"the checkpoint's crop_pct ({own_crop})")
    test_against_reference(binary, scratch, checkpoint, paths, 0.875, ["--crop-pct", "0.875"], "--crop-pct 0.875")
    test_batches_and_text(binary, scratch, checkpoint, paths)
    test_refusals(binary, scratch, checkpoint, paths)
    shutil.rmtree(data, ignore_errors=True)
    return exit_status("test_predict")


if __name__ == "__main__":
    sys.exit(main())
