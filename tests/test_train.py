"""End-to-end training on the CPU with the real binary, on a Fashion-MNIST subset.

Run by ctest as `/usr/bin/python3 tests/test_train.py <tokenformer binary> <scratch dir>`. Checks:
- a short run lowers the loss and learns something (top-1 well above chance);
- `tokenformer eval` of the final checkpoint gives the top-1 the trainer logged;
- a run stopped at a step (checkpoint) and resumed, and a run killed with SIGKILL and resumed,
  log exactly the same losses, step by step, as the uninterrupted run (bit for bit on the CPU);
- SIGTERM ends a run with exit code 130 and a checkpoint of the step it stopped at;
- a run whose loss goes non-finite skips those steps and then stops with a clear message;
- starting over an existing run is refused; config errors exit 2 naming the file, line and key;
- `inspect --config` prints the parameter counts of the four presets (DESIGN.md section 2).
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

from testlib import check, exit_status, run_command as run

BINARY = os.path.abspath(sys.argv[1])
SCRATCH = os.path.abspath(sys.argv[2])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(SCRATCH, "fashion-mnist")

# A small model on 2048 training and 500 validation images: 16 steps an epoch, seconds per run.
SMALL = ["model.depth=2", "model.dim=48", "model.heads=2", "model.n_attn=48", "model.n_ffn=96",
         "data.train_limit=2048", "data.val_limit=500", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
         "run.log_every=1", "run.ckpt_every=5", "optimizer.ema_decay=0.99", "optimizer.lr=2e-3"]

def train_command(run, extra=()):
    command = [BINARY, "train", "--config", os.path.join(REPO, "configs/fmnist_micro.yaml"), "--data", DATA,
               "--out", run, "--device", "cpu"]
    for assignment in SMALL:
        command += ["--set", assignment]
    return command + list(extra)


def records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as metrics:
        return [r for r in map(json.loads, metrics) if r["type"] == kind]


def losses(run_dir):
    """(step, loss) of every train record, losses as written (exact text comparison)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as metrics:
        rows = [json.loads(line) for line in metrics]
    return [(r["step"], repr(r["loss"])) for r in rows if r["type"] == "train"]


def test_learns():
    print("a short run learns")
    reference = os.path.join(SCRATCH, "reference")
    result = run(train_command(reference))
    check(result.returncode == 0, f"training exits 0 (got {result.returncode})")
    train = records(reference, "train")
    evals = records(reference, "eval")
    check(len(train) == 32, f"32 log records, one per step (got {len(train)})")
    first, last = sum(r["loss"] for r in train[:4]) / 4, sum(r["loss"] for r in train[-4:]) / 4
    check(last < first - 0.3, f"loss goes down: first steps {first:.3f}, last steps {last:.3f}")
    check(len(evals) == 2 and evals[-1]["top1"] > 30.0, f"top-1 after 2 epochs well above chance (10%): {evals[-1]}")
    check("ema_top1" in evals[-1], "the EMA weights are evaluated too")
    return reference


def test_eval_matches():
    """The trainer's evaluation and `tokenformer eval` agree; the trainer must evaluate the whole
    split for that, since eval has no subset option."""
    print("eval of the final checkpoint")
    json_path = os.path.join(SCRATCH, "eval.json")
    full = os.path.join(SCRATCH, "full_eval")
    result = run(train_command(full, ["--set", "data.val_limit=0", "--set", "schedule.epochs=1"]))
    check(result.returncode == 0, "one-epoch run with full evaluation exits 0")
    logged = records(full, "eval")[-1]
    result = run([BINARY, "eval", "--ckpt", os.path.join(full, "model.safetensors"), "--data", DATA,
                  "--device", "cpu", "--json", json_path])
    check(result.returncode == 0, "eval exits 0")
    last_line = result.stdout.strip().splitlines()[-1]
    check(last_line == f"top-1: {logged['top1']:.2f}%",
          f"eval's last line '{last_line}' equals the trainer's top-1 {logged['top1']:.2f}%")
    with open(json_path) as handle:
        report = json.load(handle)
    check(abs(report["top1"] - logged["top1"]) < 1e-9 and abs(report["top5"] - logged["top5"]) < 1e-9,
          f"eval JSON top-1/top-5 {report['top1']:.4f}/{report['top5']:.4f} equal the trainer's")
    check(len(report["confusion"]) == 10 and sum(map(sum, report["confusion"])) == 10000,
          "confusion matrix counts every validation image once")


def test_resume_after_stop(reference):
    print("stop at a step, then resume")
    stopped = os.path.join(SCRATCH, "stopped")
    result = run(train_command(stopped, ["--max-steps", "13"]))
    check(result.returncode == 0, "run with --max-steps 13 exits 0")
    check(os.path.isdir(os.path.join(stopped, "checkpoint-00000013")), "checkpoint of step 13 written")
    result = run([BINARY, "train", "--resume", stopped])
    check(result.returncode == 0, f"resume exits 0 (got {result.returncode})")
    check(losses(stopped) == losses(reference), "resumed run logs the same losses as the uninterrupted one")
    check(records(stopped, "eval") == records(reference, "eval"), "and the same evaluations")


def test_resume_after_kill(reference):
    print("SIGKILL mid-run, then resume")
    killed = os.path.join(SCRATCH, "killed")
    process = subprocess.Popen(train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill once a checkpoint exists and training has gone past it.
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(os.path.join(killed, "checkpoint-00000010")):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    check(os.path.islink(os.path.join(killed, "latest")), "a checkpoint existed when the run was killed")
    # What a kill during a save leaves: a temporary file of an atomic write beside a checkpoint's
    # files, and a half-written checkpoint directory of a later step. Resuming must get past both
    # (the first is pruned later, the second rewritten).
    with open(os.path.join(killed, "checkpoint-00000010", "state.safetensors.tmp.12345"), "wb") as stray:
        stray.write(b"partial")
    os.makedirs(os.path.join(killed, "checkpoint-00000025.tmp"), exist_ok=True)
    with open(os.path.join(killed, "checkpoint-00000025.tmp", "model.safetensors.tmp.999"), "wb") as stray:
        stray.write(b"partial")
    result = run([BINARY, "train", "--resume", killed])
    check(result.returncode == 0, f"resume after SIGKILL exits 0 (got {result.returncode})")
    check(losses(killed) == losses(reference), "losses after kill -9 and resume equal the uninterrupted run's")
    left = sorted(n for n in os.listdir(killed) if n.startswith("checkpoint-"))
    check(left == ["checkpoint-00000025", "checkpoint-00000030", "checkpoint-00000032"],
          f"old checkpoints pruned, stray files included, the killed save rewritten: {left}")


def test_sigterm():
    print("SIGTERM writes a checkpoint")
    terminated = os.path.join(SCRATCH, "terminated")
    process = subprocess.Popen(train_command(terminated, ["--set", "run.ckpt_every=0"]), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(terminated, "metrics.jsonl")):
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    check(process.returncode == 130, f"exit code 130 after SIGTERM (got {process.returncode})")
    step = losses(terminated)[-1][0]
    check(os.path.isdir(os.path.join(terminated, f"checkpoint-{step:08d}")),
          f"checkpoint of the last step ({step}) written")
    check("--resume" in output, "the message says how to continue")


def poison_checkpoint(source, target, tensor):
    """Copies a checkpoint with the first element of `tensor` set to NaN."""
    with open(source, "rb") as handle:
        data = bytearray(handle.read())
    header_length = struct.unpack("<Q", data[:8])[0]
    begin = json.loads(data[8:8 + header_length])[tensor]["data_offsets"][0]
    data[8 + header_length + begin:8 + header_length + begin + 4] = struct.pack("<f", float("nan"))
    with open(target, "wb") as handle:
        handle.write(data)


def test_non_finite(reference):
    print("non-finite steps")
    poisoned = os.path.join(SCRATCH, "poisoned.safetensors")
    poison_checkpoint(os.path.join(reference, "model.safetensors"), poisoned, "head.bias")
    exploding = os.path.join(SCRATCH, "exploding")
    result = run(train_command(exploding, ["--init-from", poisoned, "--set", "run.max_bad_steps=3"]), expect=1)
    check(result.returncode == 1, f"exit code 1 (got {result.returncode})")
    check("non-finite steps in a row" in result.stdout, "the message says why it stopped")
    check("update skipped" in result.stdout, "skipped steps are logged")


def test_refusals():
    print("refusals")
    reference = os.path.join(SCRATCH, "reference")
    result = run(train_command(reference), expect=2)
    check(result.returncode == 2 and "--resume" in result.stdout, "training over an existing run is refused")
    bad = os.path.join(SCRATCH, "bad.yaml")
    with open(bad, "w") as handle:
        handle.write("model:\n  dim: 96\n  dimm: 3\n")
    result = run([BINARY, "train", "--config", bad, "--data", DATA], expect=2)
    check(result.returncode == 2 and f"{bad}:3" in result.stdout and "model.dimm" in result.stdout,
          f"unknown key: exit 2 naming file, line and key: {result.stdout.strip()}")
    result = run([BINARY, "train", "--config", bad, "--set", "model.dim=abc"], expect=2)
    check(result.returncode == 2 and "model.dim" in result.stdout, "bad --set value: exit 2 naming the key")


def test_inspect_presets():
    print("inspect --config")
    for preset, count in [("b16", "114.8M"), ("b16_pm", "86.4M"), ("l16", "404.7M"), ("l16_pm", "304.0M")]:
        result = run([BINARY, "inspect", "--config", os.path.join(REPO, f"configs/tokenformer_{preset}.yaml")])
        check(result.returncode == 0 and f"({count})" in result.stdout, f"tokenformer_{preset}: {count} parameters")


def main():
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH)
    prepared = run([BINARY, "prepare", "fashion-mnist", "--out", DATA])
    if prepared.returncode != 0:
        print("cannot prepare Fashion-MNIST (apt-get install dataset-fashion-mnist)")
        return 1
    reference = test_learns()
    test_eval_matches()
    test_resume_after_stop(reference)
    test_resume_after_kill(reference)
    test_sigterm()
    test_non_finite(reference)
    test_refusals()
    test_inspect_presets()
    shutil.rmtree(DATA, ignore_errors=True)
    return exit_status("test_train")


if __name__ == "__main__":
    sys.exit(main())
