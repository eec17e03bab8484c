"""`tokenformer eval` against an independent PyTorch evaluation of the same checkpoint.

Run by ctest as `/usr/bin/python3 tests/test_eval.py <tokenformer binary> <scratch dir>`. It prepares
Fashion-MNIST, trains a small model briefly on the CPU, copies 1000 validation images (100 a class)
into their own ImageFolder tree, and checks:
- the reference (PIL decode, torchvision's eval transform Resize(int(S / crop_pct), BICUBIC) +
  CenterCrop(S) + ToTensor + Normalize(ImageNet), tests/reference/tokenformer_torch.py in float64)
  gets the same top-1 and top-5 as `eval`, and the same prediction per image (from `predict`'s
  logits) except where the reference's two best logits are within 1e-4 of each other; with the
  checkpoint's crop_pct, with --crop-pct 0.875 (a real resize of the 28x28 images), and with --ema;
- the --json per-class accuracies and confusion matrix agree with top-1 and with the reference;
- bad inputs exit 1 or 2 with a message naming the problem: missing checkpoint, missing data, a
  tree with 9 classes, a renamed class folder, a tensor of another shape, a config that does not
  match the tensors, a truncated checkpoint, --ema without a training state, bad option values,
  more than 1% of the images unreadable.

tests/test_predict.py imports the helpers here (data, training, the reference transform and model).
"""

import json
import os
import shutil
import struct
import sys

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
import tokenformer_torch as ref  # noqa: E402
from testlib import check, exit_status, run_command  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIE = 1e-4  # reference logits closer than this may rank either way in fp32

# A small model trained for two epochs on 2048 images: seconds on the CPU, well above chance.
SMALL = ["model.depth=2", "model.dim=48", "model.heads=2", "model.n_attn=48", "model.n_ffn=96",
         "data.train_limit=2048", "data.val_limit=500", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
         "optimizer.lr=2e-3", "optimizer.ema_decay=0.99"]

def run(command, expect=0):
    """Runs the binary; stdout and stderr apart (predict --json prints JSON on stdout, logs on stderr)."""
    return run_command(command, expect, separate_stderr=True)


# ---- data and a trained checkpoint -------------------------------------------------------------

def prepare_and_train(binary, scratch):
    """Empties scratch, prepares Fashion-MNIST into it and trains a small model; returns (data
    root, run dir), or None when the data set is not installed."""
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    data = os.path.join(scratch, "fashion-mnist")
    if run([binary, "prepare", "fashion-mnist", "--out", data]).returncode != 0:
        print("cannot prepare Fashion-MNIST (apt-get install dataset-fashion-mnist)")
        return None
    run_dir = os.path.join(scratch, "run")
    command = [binary, "train", "--config", os.path.join(REPO, "configs/fmnist_micro.yaml"), "--data", data,
               "--out", run_dir, "--device", "cpu"]
    for assignment in SMALL:
        command += ["--set", assignment]
    result = run(command)
    check(result.returncode == 0, "a small model trains (2 epochs on 2048 images)")
    return data, run_dir


def copy_subset(data, target, per_class, classes=None):
    """An ImageFolder tree target/val holding the first per_class images of each class (sorted)."""
    source = os.path.join(data, "val")
    for name in classes or sorted(os.listdir(source)):
        os.makedirs(os.path.join(target, "val", name))
        for file in sorted(os.listdir(os.path.join(source, name)))[:per_class]:
            shutil.copy(os.path.join(source, name, file), os.path.join(target, "val", name, file))


def image_files(root):
    """(path, label) in ImageFolder order: classes sorted, files sorted within each."""
    classes = sorted(os.listdir(root))
    return [(os.path.join(root, name, file), label) for label, name in enumerate(classes)
            for file in sorted(os.listdir(os.path.join(root, name)))]


# ---- the reference ---------------------------------------------------------------------------

def eval_transform(img_size, crop_pct):
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference_inputs(paths, img_size, crop_pct):
    """float32 [N, 3, S, S]: PIL decode, RGB, torchvision's eval transform."""
    transform = eval_transform(img_size, crop_pct)
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


def checkpoint_crop_pct(metadata):
    return float(metadata["crop_pct"]) if "crop_pct" in metadata else 0.875


def reference_logits(config, params, inputs, batch=250):
    """float64 logits [N, classes] of float32 inputs."""
    ones = torch.ones(config.depth, 2, batch, dtype=torch.float64)
    with torch.no_grad():
        return torch.cat([ref.forward(params, config, chunk.double(), ones[:, :, :len(chunk)])
                          for chunk in inputs.split(batch)]).numpy()


def ema_params(state_path, config):
    arrays, _ = ref.read_safetensors(state_path)
    return {name: torch.from_numpy(arrays["ema." + name]).double() for name in ref.parameter_shapes(config)}


def near_tie(logits, a, b):
    return abs(logits[a] - logits[b]) < TIE


# ---- checks ------------------------------------------------------------------------------------

def top_counts(logits, labels):
    """(top-1 correct, top-5 correct, predictions); top-5 counts ties for the label, as eval does."""
    predictions = logits.argmax(axis=1)
    higher = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return int((predictions == labels).sum()), int((higher < 5).sum()), predictions


def check_eval_against_reference(binary, subset, checkpoint, logits, labels, options, what):
    """eval's top-1/top-5 and JSON against reference logits of the same images."""
    json_path = os.path.join(os.path.dirname(subset), "eval.json")
    result = run([binary, "eval", "--ckpt", checkpoint, "--data", subset, "--device", "cpu", "--batch", "64",
                  "--json", json_path] + options)
    check(result.returncode == 0, f"{what}: eval exits 0")
    if result.returncode != 0:
        return
    with open(json_path) as handle:
        report = json.load(handle)
    count = len(labels)
    top1, top5, predictions = top_counts(logits, labels)
    sorted_logits = np.sort(logits, axis=1)
    ties = int((sorted_logits[:, -1] - sorted_logits[:, -2] < TIE).sum())
    slack = 100.0 * ties / count + 0.01
    last_line = result.stdout.strip().splitlines()[-1]
    check(last_line == f"top-1: {report['top1']:.2f}%", f"{what}: the last stdout line is '{last_line}'")
    check(report["images"] == count, f"{what}: {count} images evaluated")
    wait_lines = [line for line in result.stdout.splitlines() if line.startswith("data wait: ")]
    check(0.0 <= report["data_wait_percent"] <= 100.0 and
          wait_lines == [f"data wait: {report['data_wait_percent']:.0f}%"],
          f"{what}: the loader wait is a share of the time ({report['data_wait_percent']:.1f}%, printed {wait_lines})")
    check(abs(report["top1"] - 100.0 * top1 / count) <= slack,
          f"{what}: top-1 {report['top1']:.2f}% equals the reference's {100.0 * top1 / count:.2f}% "
          f"({ties} near ties)")
    check(abs(report["top5"] - 100.0 * top5 / count) <= slack,
          f"{what}: top-5 {report['top5']:.2f}% equals the reference's {100.0 * top5 / count:.2f}%")
    reference_loss = float(np.mean(torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), reduction="none").numpy()))
    check(abs(report["loss"] - reference_loss) < 1e-4,
          f"{what}: loss {report['loss']:.6f} equals the reference's {reference_loss:.6f}")
    confusion = np.array(report["confusion"])
    expected = np.zeros_like(confusion)
    np.add.at(expected, (labels, predictions), 1)
    check(np.abs(confusion - expected).sum() <= 2 * ties,
          f"{what}: the confusion matrix equals the reference's (up to near ties)")
    check(confusion.sum() == count and abs(100.0 * np.trace(confusion) / count - report["top1"]) < 1e-9,
          f"{what}: the confusion matrix counts every image once and its diagonal is top-1")
    names = sorted(os.listdir(os.path.join(subset, "val")))
    per_class_ok = len(report["per_class"]) == len(names) and all(
        entry["class"] == names[c] and entry["images"] == confusion[c].sum()
        and abs(entry["top1"] - 100.0 * confusion[c, c] / confusion[c].sum()) < 1e-9
        for c, entry in enumerate(report["per_class"]))
    check(per_class_ok, f"{what}: per-class accuracies are the confusion matrix's diagonal over its rows")


def check_predictions_per_image(binary, scratch, checkpoint, paths, logits, crop_pct, what):
    """predict's logits of every image of the subset give the reference's prediction per image."""
    dump = os.path.join(scratch, "subset_logits.npy")
    result = run([binary, "predict", "--ckpt", checkpoint, "--device", "cpu", "--crop-pct", str(crop_pct),
                  "--batch", "100", "--topk", "1", "--dump-logits", dump] + paths)
    check(result.returncode == 0, f"{what}: predict over the whole subset exits 0")
    if result.returncode != 0:
        return
    ours = np.load(dump)
    disagree = [i for i in np.flatnonzero(ours.argmax(axis=1) != logits.argmax(axis=1))
                if not near_tie(logits[i], ours[i].argmax(), logits[i].argmax())]
    check(not disagree,
          f"{what}: every image's prediction equals the reference's, near ties aside (differ: {disagree[:5]})")
    error = np.abs(ours - logits).max() / max(1.0, np.abs(logits).max())
    check(error < 1e-4, f"{what}: predict's logits equal the reference's to {error:.2e} relative")


def rewrite_header(source, target, edit):
    """Copies a safetensors file with its JSON header changed by edit(header)."""
    with open(source, "rb") as handle:
        data = handle.read()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(target, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data[8 + length:])


def transpose_head(header):
    header["head.weight"]["shape"] = header["head.weight"]["shape"][::-1]


def shrink_ffn_in_config(header):
    config = json.loads(header["__metadata__"]["config"])
    config["n_ffn"] = config["n_ffn"] // 2
    header["__metadata__"]["config"] = json.dumps(config)


def bad_checkpoints(checkpoint, scratch):
    """(path, words the message must hold, what) of checkpoints that must be refused."""
    cases = []
    other_shape = os.path.join(scratch, "other_shape.safetensors")
    rewrite_header(checkpoint, other_shape, transpose_head)
    cases.append((other_shape, ["head.weight", "shape"], "a tensor of another shape"))
    other_config = os.path.join(scratch, "other_config.safetensors")
    rewrite_header(checkpoint, other_config, shrink_ffn_in_config)
    cases.append((other_config, ["ffn", "shape"], "a config that does not match the tensors"))
    truncated = os.path.join(scratch, "truncated.safetensors")
    with open(checkpoint, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read()[:-1000])
    cases.append((truncated, ["truncated.safetensors"], "a truncated checkpoint"))
    return cases


def test_bad_inputs(binary, scratch, data, checkpoint):
    print("bad inputs")

    def refused(command, words, what, codes=(1, 2)):
        result = run(command, expect=None)
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        check(result.returncode in codes and all(w in message for w in words),
              f"{what}: exit {result.returncode}, '{message[:200]}'")

    def evaluate(ckpt, root, *options):
        return [binary, "eval", "--ckpt", ckpt, "--data", root, "--device", "cpu"] + list(options)

    small = os.path.join(scratch, "small")
    copy_subset(data, small, 3)
    missing = os.path.join(scratch, "missing.safetensors")
    refused(evaluate(missing, small), [missing, "No such file"], "missing checkpoint", (1,))
    refused(evaluate(checkpoint, os.path.join(scratch, "nowhere")), ["nowhere"], "missing data root")
    nine = os.path.join(scratch, "nine")
    copy_subset(data, nine, 3, [c for c in sorted(os.listdir(os.path.join(data, "val"))) if c != "Trouser"])
    refused(evaluate(checkpoint, nine), ["10 classes", "9", "'Trouser'"], "a tree of 9 classes")
    renamed = os.path.join(scratch, "renamed")
    copy_subset(data, renamed, 3)
    os.rename(os.path.join(renamed, "val", "Coat"), os.path.join(renamed, "val", "Coats"))
    refused(evaluate(checkpoint, renamed), ["'Coat'", "'Coats'"], "a renamed class folder")
    # Two of 30 files unreadable: more than the loader's 1%, judged at the end of the split, while
    # eval holds the batch before it (loaded one batch ahead).
    damaged = os.path.join(scratch, "damaged")
    copy_subset(data, damaged, 3)
    for name in ("Coat", "Bag"):
        folder = os.path.join(damaged, "val", name)
        with open(os.path.join(folder, sorted(os.listdir(folder))[0]), "wb") as file:
            file.write(b"not an image")
    refused(evaluate(checkpoint, damaged, "--batch", "8"), [damaged, "could not be loaded", "damaged"],
            "unreadable images (over 1%)", (1,))
    for path, words, what in bad_checkpoints(checkpoint, scratch):
        refused(evaluate(path, small), [path] + words, what, (1,))
    alone = os.path.join(scratch, "alone")
    os.makedirs(alone)
    shutil.copy(checkpoint, alone)
    refused(evaluate(os.path.join(alone, "model.safetensors"), small, "--ema"),
            ["--ema", os.path.join(alone, "state.safetensors")], "--ema without a training state", (1,))
    refused(evaluate(checkpoint, small, "--crop-pct", "1.5"), ["--crop-pct"], "--crop-pct out of range", (2,))
    refused(evaluate(checkpoint, small, "--device", "gpu"), ["--device", "gpu"], "an unknown device", (2,))
    refused(evaluate(checkpoint, small, "--bogus"), ["--bogus"], "an unknown option", (2,))
    refused([binary, "eval", "--data", small], ["--ckpt"], "no --ckpt", (2,))


def main():
    binary, scratch = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    prepared = prepare_and_train(binary, scratch)
    if prepared is None:
        return 1
    data, run_dir = prepared
    checkpoint = os.path.join(run_dir, "model.safetensors")
    subset = os.path.join(scratch, "subset")
    copy_subset(data, subset, 100)
    files = image_files(os.path.join(subset, "val"))
    paths, labels = [p for p, _ in files], np.array([label for _, label in files])
    config, params, metadata = ref.load_checkpoint(checkpoint)
    own_crop = checkpoint_crop_pct(metadata)

    for crop_pct, options in [(own_crop, []), (0.875, ["--crop-pct", "0.875"])]:
        what = f"crop_pct {crop_pct}" + (" (the checkpoint's)" if not options else "")
        print(what)
        logits = reference_logits(config, params, reference_inputs(paths, config.img_size, crop_pct))
        top1 = 100.0 * (logits.argmax(axis=1) == labels).mean()
        check(top1 > 30.0, f"{what}: the reference's top-1 {top1:.2f}% is well above chance")
        check_eval_against_reference(binary, subset, checkpoint, logits, labels, options, what)
        check_predictions_per_image(binary, scratch, checkpoint, paths, logits, crop_pct, what)

    print("EMA weights")
    ema = ema_params(os.path.join(run_dir, "state.safetensors"), config)
    logits = reference_logits(config, ema, reference_inputs(paths, config.img_size, own_crop))
    check_eval_against_reference(binary, subset, checkpoint, logits, labels, ["--ema"], "--ema")

    test_bad_inputs(binary, scratch, data, checkpoint)
    shutil.rmtree(data, ignore_errors=True)
    return exit_status("test_eval")


if __name__ == "__main__":
    sys.exit(main())
