"""`tokenformer prepare` and `tokenformer bench loader` end to end, on small inputs made here.

Run as: /usr/bin/python3 tests/test_prepare.py TOKENFORMER_BINARY SCRATCH_DIR
- fashion-mnist from small gzip'd IDX files (--source): the tree, the class folder names, file
  names, grayscale JPEGs within 2 grey levels of the source pixels; a second run says the tree is
  complete and does nothing; a tree left half-written (DIR.tmp) by a killed run is replaced;
  missing files name the path and the Debian package; wrong magic numbers and counts name the file;
- imagenet-like from a folder of images (--source): ImageNet's sizes, 4:2:0 JPEGs, 10 classes,
  a 90/10 split, the same bytes for the same seed and others for another seed;
- bench loader runs on it and reports the throughput.
Needs python3-pil and python3-numpy.
"""
import gzip
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
from PIL import Image, JpegImagePlugin

from testlib import check, exit_status

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]

def run(binary, *arguments):
    result = subprocess.run([binary] + list(arguments), capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def write_idx(directory, prefix, images, labels, image_magic=0x803, label_magic=0x801):
    with gzip.open(os.path.join(directory, prefix + "-images-idx3-ubyte.gz"), "wb") as file:
        file.write(struct.pack(">IIII", image_magic, len(images), 28, 28) + images.tobytes())
    with gzip.open(os.path.join(directory, prefix + "-labels-idx1-ubyte.gz"), "wb") as file:
        file.write(struct.pack(">II", label_magic, len(labels)) + labels.tobytes())


def fashion_images(count, seed):
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:28, 0:28]
    images = [((x * (3 + i % 5) + y * (i % 7) + generator.integers(0, 20, (28, 28))) % 256).astype(np.uint8)
              for i in range(count)]
    return np.stack(images), (np.arange(count) % 10).astype(np.uint8)


def list_tree(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


def test_fashion_mnist(binary, scratch):
    source = os.path.join(scratch, "fashion-source")
    os.makedirs(source, exist_ok=True)
    train_images, train_labels = fashion_images(30, 1)
    val_images, val_labels = fashion_images(10, 2)
    write_idx(source, "train", train_images, train_labels)
    write_idx(source, "t10k", val_images, val_labels)

    out = os.path.join(scratch, "fashion")
    os.makedirs(out + ".tmp/train/junk", exist_ok=True)  # as a killed run would leave it
    code, text = run(binary, "prepare", "fashion-mnist", "--out", out, "--source", source)
    if not check(code == 0, "prepare fashion-mnist failed: " + text):
        return
    check(not os.path.exists(out + ".tmp"), "DIR.tmp left behind")
    check(sorted(os.listdir(os.path.join(out, "train"))) == sorted(CLASSES), "train class folders")
    check(sorted(os.listdir(os.path.join(out, "val"))) == sorted(CLASSES), "val class folders")
    for split, images, labels in (("train", train_images, train_labels), ("val", val_images, val_labels)):
        files = [f for f in list_tree(os.path.join(out, split))]
        check(len(files) == len(images), "%s: %d files, expected %d" % (split, len(files), len(images)))
        for i in range(len(images)):
            path = os.path.join(out, split, CLASSES[labels[i]], "%05d.jpg" % i)
            if not check(os.path.exists(path), "missing " + path):
                continue
            image = Image.open(path)
            check(image.format == "JPEG" and image.mode == "L", "%s: %s %s" % (path, image.format, image.mode))
            difference = np.abs(np.asarray(image).astype(int) - images[i]).max()
            check(difference <= 2, "%s: pixels differ by %d from the IDX image" % (path, difference))

    before = list_tree(out)
    code, text = run(binary, "prepare", "fashion-mnist", "--out", out, "--source", source)
    check(code == 0 and "complete" in text and list_tree(out) == before, "second run did not skip: " + text)

    code, text = run(binary, "prepare", "fashion-mnist", "--out", os.path.join(scratch, "none"), "--source",
                     os.path.join(scratch, "nowhere"))
    check(code == 1 and "nowhere/train-labels-idx1-ubyte.gz" in text and "apt-get install dataset-fashion-mnist" in text,
          "missing source: " + text)

    broken = os.path.join(scratch, "fashion-broken")
    os.makedirs(broken, exist_ok=True)
    write_idx(broken, "train", train_images, train_labels, image_magic=0x804)
    write_idx(broken, "t10k", val_images, val_labels)
    code, text = run(binary, "prepare", "fashion-mnist", "--out", os.path.join(scratch, "b1"), "--source", broken)
    check(code == 1 and "train-images-idx3-ubyte.gz" in text and "magic" in text, "bad magic: " + text)
    write_idx(broken, "train", train_images, train_labels[:20])
    code, text = run(binary, "prepare", "fashion-mnist", "--out", os.path.join(scratch, "b2"), "--source", broken)
    check(code == 1 and "train-images-idx3-ubyte.gz" in text and "20 labels" in text, "count mismatch: " + text)
    check(not os.path.exists(os.path.join(scratch, "b2")), "a failed prepare left its output")


def make_photos(directory):
    os.makedirs(directory, exist_ok=True)
    y, x = np.mgrid[0:600, 0:900]
    for i in range(3):
        pixels = np.stack([(x // (2 + i) + y // 3) % 256, (x * y // 500 + 40 * i) % 256, (y // 2 + i * 70) % 256],
                          axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, "photo%d.%s" % (i, "png" if i == 2 else "jpg")))


def test_imagenet_like(binary, scratch):
    photos = os.path.join(scratch, "photos")
    make_photos(photos)
    # The third lies under folders that do not exist yet: prepare creates them, as mkdir -p would.
    outs = [os.path.join(scratch, name) for name in ("inet-a", "inet-b", os.path.join("new", "parent", "inet-c"))]
    for out, seed in zip(outs, ("3", "3", "4")):
        code, text = run(binary, "prepare", "imagenet-like", "--out", out, "--count", "100", "--seed", seed,
                         "--source", photos)
        if not check(code == 0, "prepare imagenet-like failed: " + text):
            return None
    files = list_tree(outs[0])
    images = [f for f in files if f.endswith(".jpg")]
    check(len(images) == 100, "%d images, expected 100" % len(images))
    check(sum(f.startswith("val/") for f in images) == 10, "val split is not 10%")
    for split in ("train", "val"):
        folders = sorted(os.listdir(os.path.join(outs[0], split)))
        check(len(folders) == 10 and all(os.listdir(os.path.join(outs[0], split, f)) for f in folders),
              "%s: not 10 classes with images" % split)
    for name in images:
        image = Image.open(os.path.join(outs[0], name))
        short, long = sorted(image.size)
        check(long == 500 and 333 <= short <= 500, "%s: size %s is not ImageNet-like" % (name, image.size))
        check(JpegImagePlugin.get_sampling(image) == 2, "%s: not 4:2:0" % name)
    same = all(open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read()
               for f in images)
    check(list_tree(outs[1]) == files and same, "the same seed gave other files")
    other = [f for f in list_tree(outs[2]) if f.endswith(".jpg")]
    check(other == images and any(open(os.path.join(outs[0], f), "rb").read() !=
                                  open(os.path.join(outs[2], f), "rb").read() for f in images),
          "another seed gave the same files")
    code, text = run(binary, "prepare", "imagenet-like", "--out", outs[0], "--count", "100", "--seed", "3",
                     "--source", photos)
    check(code == 0 and "complete" in text, "second imagenet-like run did not skip: " + text)
    code, text = run(binary, "prepare", "imagenet-like", "--out", outs[0], "--count", "41", "--seed", "3",
                     "--source", photos)
    check(code == 1 and "another prepared dataset" in text, "a different set into the same DIR: " + text)
    return outs[0]


def test_bench_loader(binary, data):
    for transform in ("train", "eval"):
        split = "train" if transform == "train" else "val"
        code, text = run(binary, "bench", "loader", "--data", data, "--split", split, "--transform", transform,
                         "--workers", "2", "--batches", "3", "--batch", "4", "--size", "64")
        check(code == 0 and "img/s per worker" in text and "MB/s" in text and "decode" in text,
              "bench loader --transform %s: %s" % (transform, text))


def main():
    binary, scratch = os.path.abspath(sys.argv[1]), sys.argv[2]
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    test_fashion_mnist(binary, scratch)
    data = test_imagenet_like(binary, scratch)
    if data:
        test_bench_loader(binary, data)
    return exit_status("test_prepare")


if __name__ == "__main__":
    sys.exit(main())
