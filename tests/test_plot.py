"""`tokenformer plot` (train/cmd_plot.c): loss, learning-rate and accuracy curves through gnuplot.

Run by ctest as `/usr/bin/python3 tests/test_plot.py <tokenformer binary> <scratch dir>`. On synthetic
metrics.jsonl files in the format train/train.c writes, checks:
- a run with EMA: RUN/curves.png is a PNG that PIL opens, of the expected size and not blank;
- --out to a path with spaces, quotes, backquotes, '$(...)' and '@' in it: written there, and
  nothing the path spells out is run;
- runs with only train records, only eval records, and a torn last line (a killed run) still plot;
  the torn line is reported by its number;
- --compare of two runs draws one PNG;
- errors name the problem: no metrics.jsonl, no records, an unwritable output, gnuplot missing
  (with the package to install), gnuplot failing (with its message); usage errors exit 2;
- no temporary directory is left behind.
Needs Debian's gnuplot-nox (scripts/setup.sh installs it). Exits 1 on any failure.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

from PIL import Image

from testlib import check, exit_status

BINARY = os.path.abspath(sys.argv[1])
SCRATCH = os.path.abspath(sys.argv[2])
TEMPORARY = "/tmp/tokenformer-plot-*"

def plot(*args, env=None):
    return subprocess.run([BINARY, "plot", *args], capture_output=True, text=True, env=env)


def train_record(step, steps_per_epoch=100):
    epoch = step / steps_per_epoch
    lr = 1e-3 * min(1.0, epoch / 2) * 0.5 * (1 + math.cos(math.pi * epoch / 10))
    return {"type": "train", "step": step, "epoch": epoch, "loss": 2.3 * math.exp(-epoch / 4) + 0.3,
            "lr": lr, "grad_norm": 1.5, "img_per_s": 812.5, "data_wait": 0.02}


def eval_record(step, ema, steps_per_epoch=100):
    epoch = step / steps_per_epoch
    record = {"type": "eval", "step": step, "epoch": epoch, "top1": 90 * (1 - math.exp(-epoch / 3)),
              "top5": 99 * (1 - math.exp(-epoch / 2)), "loss": 2.0 * math.exp(-epoch / 4) + 0.4}
    if ema:
        record.update(ema_top1=record["top1"] + 0.5, ema_top5=record["top5"] + 0.2, ema_loss=record["loss"] - 0.05)
    return record


def write_run(name, train=True, evals=True, ema=True, tail=""):
    run = os.path.join(SCRATCH, name)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as metrics:
        for step in range(10, 1001, 10):
            if train:
                metrics.write(json.dumps(train_record(step)) + "\n")
            if evals and step % 100 == 0:
                metrics.write(json.dumps(eval_record(step, ema)) + "\n")
        metrics.write(tail)
    return run


def check_png(path, what):
    if not os.path.isfile(path):
        check(False, f"{what}: {path} written")
        return
    try:
        with Image.open(path) as image:
            image.load()
            size, mode, format_ = image.size, image.mode, image.format
            colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    except Exception as error:  # PIL raises several kinds for a broken file
        check(False, f"{what}: PIL cannot open {path}: {error}")
        return
    distinct = len(colors) if colors else 1 << 20
    check(format_ == "PNG" and 600 <= size[0] <= 4000 and 600 <= size[1] <= 4000 and distinct >= 4,
          f"{what}: a PNG of {size[0]}x{size[1]} ({mode}, {distinct} colours)")


def check_drawing():
    run = write_run("full")
    result = plot(run)
    check(result.returncode == 0, f"plot RUN exits 0 (got {result.returncode}: {result.stderr.strip()})")
    check_png(os.path.join(run, "curves.png"), "plot RUN with EMA")

    odd_dir = os.path.join(SCRATCH, "odd name's \"dir\" `touch backquote` $(touch dollar) @x")
    os.makedirs(odd_dir, exist_ok=True)
    out = os.path.join(odd_dir, "curves 'q' `touch pwned`.png")
    result = plot(run, "--out", out)
    check(result.returncode == 0, f"--out with quotes and backquotes exits 0 ({result.stderr.strip()})")
    check_png(out, "--out to an odd path")
    spawned = [name for name in ("backquote", "dollar", "pwned") if os.path.exists(os.path.join(os.getcwd(), name))
               or os.path.exists(os.path.join(odd_dir, name))]
    check(not spawned, f"nothing in the path was run (created: {spawned})")

    for name, options in (("train-only", {"evals": False}), ("eval-only", {"train": False}),
                          ("no-ema", {"ema": False})):
        run = write_run(name, **options)
        result = plot(run)
        check(result.returncode == 0, f"{name} run exits 0 ({result.stderr.strip()})")
        check_png(os.path.join(run, "curves.png"), f"{name} run")

    run = write_run("torn", tail='{"type": "train", "step": 1010, "epo')
    result = plot(run)
    check(result.returncode == 0 and "line 111" in result.stderr,
          f"a torn last line is skipped and named: {result.stderr.strip()}")
    check_png(os.path.join(run, "curves.png"), "torn run")

    out = os.path.join(SCRATCH, "compare.png")
    result = plot("--compare", os.path.join(SCRATCH, "full"), os.path.join(SCRATCH, "no-ema") + "/", "--out", out)
    check(result.returncode == 0, f"--compare exits 0 ({result.stderr.strip()})")
    check_png(out, "--compare of two runs")


def check_error(result, status, needles, what):
    message = result.stderr.strip()
    ok = result.returncode == status and all(needle in message for needle in needles)
    check(ok, f"{what}: exit {result.returncode}, '{message}'")


def check_errors():
    missing = os.path.join(SCRATCH, "no-such-run")
    check_error(plot(missing), 1, ["metrics.jsonl", missing], "missing metrics.jsonl")

    empty = os.path.join(SCRATCH, "empty")
    os.makedirs(empty, exist_ok=True)
    with open(os.path.join(empty, "metrics.jsonl"), "w") as metrics:
        metrics.write('{"type": "note", "step": 0}\n\n')
    check_error(plot(empty), 1, ["no train or eval records", "metrics.jsonl"], "metrics.jsonl without records")

    run = os.path.join(SCRATCH, "full")
    out = os.path.join(SCRATCH, "no-such-dir", "x.png")
    check_error(plot(run, "--out", out), 1, ["cannot write", out], "unwritable output")

    no_tools = os.path.join(SCRATCH, "empty-path")
    os.makedirs(no_tools, exist_ok=True)
    env = dict(os.environ, PATH=no_tools)
    check_error(plot(run, env=env), 1, ["gnuplot not found", "apt-get install gnuplot-nox"], "gnuplot missing")

    fake_dir = os.path.join(SCRATCH, "fake-gnuplot")
    os.makedirs(fake_dir, exist_ok=True)
    fake = os.path.join(fake_dir, "gnuplot")
    with open(fake, "w") as script:
        script.write("#!/bin/sh\necho 'plot.gp line 7: undefined variable: nonsense' >&2\nexit 3\n")
    os.chmod(fake, 0o755)
    env = dict(os.environ, PATH=fake_dir + os.pathsep + os.environ.get("PATH", "/usr/bin"))
    out = os.path.join(SCRATCH, "failed.png")
    check_error(plot(run, "--out", out, env=env), 1, ["gnuplot failed (exit status 3)", "undefined variable: nonsense"],
                "gnuplot failing")
    check(not os.path.exists(out), "a failed plot leaves no output file")

    check_error(plot(), 2, ["run directory"], "no run directory")
    check_error(plot(run, run), 2, ["--compare"], "two runs without --compare")
    check_error(plot(run, "--bogus"), 2, ["--bogus"], "unknown option")


def main():
    if shutil.which("gnuplot") is None:
        print("FAIL gnuplot is not installed: apt-get install -y gnuplot-nox (scripts/setup.sh does)")
        return 1
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH)
    before = set(glob.glob(TEMPORARY))
    check_drawing()
    check_errors()
    left = set(glob.glob(TEMPORARY)) - before
    check(not left, f"no temporary directory left behind ({sorted(left)})")
    return exit_status("test_plot")


if __name__ == "__main__":
    sys.exit(main())
