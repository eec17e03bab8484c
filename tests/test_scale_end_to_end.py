"""End-to-end progressive scaling with the real binary and the PyTorch reference, on the CPU.

Run by ctest as `/usr/bin/python3 tests/test_scale_end_to_end.py <tokenformer binary> <scratch dir>`.
(The C tests of growth are tests/test_scale.c; a .py of the same name would clash with it in
CMake's test names.) A small model trains one epoch on a Fashion-MNIST subset, then
`tokenformer scale --factor 2 --state` grows it to twice the parameter tokens. Checks:
- the grown file: old rows as they were, new key rows 0, new value rows ~ N(0, 2 / (depth sqrt(dim))),
  n_norm kept, the growth history entry; `tokenformer inspect` shows all of it;
- `tokenformer eval` gives the same top-1 for both checkpoints;
- the float64 reference (tests/reference/tokenformer_torch.py) computes the same logits for both, to
  1e-6 relative, and for the EMA weights of both state files too; with --key-init random --norm
  current the logits change, and the command says that it does not preserve the function;
- the grown state: old moments bit for bit, new rows 0, progress kept;
- `tokenformer train --init-from grown --init-state grown_state` runs; its first loss equals the
  first loss of the same continuation of the model before growth (same seed: same batch, same drop
  path) and is close to the last loss before growth.
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
import tokenformer_torch as reference  # noqa: E402
from testlib import check, exit_status, failures, run_command as run  # noqa: E402

BINARY = os.path.abspath(sys.argv[1])
SCRATCH = os.path.abspath(sys.argv[2])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(SCRATCH, "fashion-mnist")

# A small model on 2048 training images: 16 steps an epoch, seconds per run.
SMALL = ["model.depth=2", "model.dim=48", "model.heads=2", "model.n_attn=48", "model.n_ffn=96",
         "data.train_limit=2048", "data.val_limit=500", "schedule.epochs=1", "schedule.warmup_epochs=0.5",
         "run.log_every=1", "optimizer.ema_decay=0.99", "optimizer.lr=2e-3"]

def train_command(out, extra=()):
    command = [BINARY, "train", "--config", os.path.join(REPO, "configs/fmnist_micro.yaml"), "--data", DATA,
               "--out", out, "--device", "cpu"]
    for assignment in SMALL:
        command += ["--set", assignment]
    return command + list(extra)


def train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as metrics:
        return [r["loss"] for r in map(json.loads, metrics) if r["type"] == "train"]


def relative_error(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def logits_of(path, images, params=None):
    """float64 reference logits of a checkpoint (or of other params of its model) on images."""
    config, loaded, _ = reference.load_checkpoint(path)
    params = params if params is not None else loaded
    ones = torch.ones(config.depth, 2, images.shape[0], dtype=torch.float64)
    with torch.no_grad():
        return reference.forward(params, config, images, ones)


def state_set(path, prefix):
    arrays, metadata = reference.read_safetensors(path)
    return {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix)}, metadata


def ema_params(path):
    arrays, _ = state_set(path, "ema.")
    return {name: torch.from_numpy(array).to(torch.float64) for name, array in arrays.items()}


def top1(checkpoint):
    result = run([BINARY, "eval", "--ckpt", checkpoint, "--data", DATA, "--device", "cpu"])
    lines = result.stdout.strip().splitlines()
    return lines[-1] if result.returncode == 0 and lines else f"eval failed ({result.returncode})"


# ---- the tests --------------------------------------------------------------------------------

def test_grown_file(original, grown, grown_output):
    print("the grown checkpoint")
    config, params, _ = reference.load_checkpoint(original)
    grown_config, grown_params, metadata = reference.load_checkpoint(grown)
    check((grown_config.n_attn, grown_config.n_ffn) == (96, 192), f"tokens 48/96 -> "
          f"{grown_config.n_attn}/{grown_config.n_ffn}")
    check(grown_config.n_norm == config.n_norm, f"n_norm kept: {grown_config.n_norm}")
    old_rows_kept, new_keys_zero, new_values = True, True, []
    for name, tensor in params.items():
        rows = tensor.shape[0]
        old_rows_kept &= torch.equal(grown_params[name][:rows], tensor)
        if name.endswith("key_tokens"):
            new_keys_zero &= bool((grown_params[name][rows:] == 0).all())
        elif name.endswith("value_tokens"):
            new_values.append(grown_params[name][rows:].detach().flatten())
    values = torch.cat(new_values)
    expected_std = 2 / (config.depth * math.sqrt(config.dim))
    check(old_rows_kept, "every old row (and every other tensor) as it was")
    check(new_keys_zero, "new key rows are 0")
    check(abs(float(values.std()) / expected_std - 1) < 0.05 and abs(float(values.mean())) < 0.05 * expected_std,
          f"new value rows ~ N(0, {expected_std:.4f}): std {float(values.std()):.4f}")
    history = json.loads(metadata["growth_history"])
    entry = history[-1] if history else {}
    check(len(history) == 1 and entry.get("from") == [48, 96] and entry.get("to") == [96, 192]
          and entry.get("key_init") == "zero" and entry.get("norm") == "fixed" and entry.get("seed") == 0
          and entry.get("step") == int(metadata.get("step", -1)) and entry.get("time", "").endswith("Z"),
          f"growth history: {metadata['growth_history']}")
    check("function is preserved" in grown_output, "the command says the function is preserved")

    result = run([BINARY, "inspect", grown])
    check(result.returncode == 0 and "n_attn 96, n_ffn 192" in result.stdout
          and "block  1: tokens 96 96 96 96 192, n_norm 48 48 48 48 96" in result.stdout
          and '"from":[48,96],"to":[96,192]' in result.stdout,
          "inspect shows the token counts, n_norm and the growth history")


def test_grown_state(state, grown_state):
    print("the grown training state")
    for prefix in ("adamw.m.", "adamw.v."):
        before, metadata = state_set(state, prefix)
        after, grown_metadata = state_set(grown_state, prefix)
        kept = all(np.array_equal(after[name][:array.shape[0]], array) for name, array in before.items())
        zero = all(not after[name][array.shape[0]:].any() for name, array in before.items())
        check(kept and zero and set(before) == set(after), f"{prefix}: old rows bit for bit, new rows 0")
    check(metadata["progress"] == grown_metadata["progress"], f"progress kept: {grown_metadata['progress']}")


def test_logits(original, grown, state, grown_state, images):
    print("logits of the float64 reference")
    before, after = logits_of(original, images), logits_of(grown, images)
    error = relative_error(after, before)
    check(error < 1e-6, f"zero keys, fixed n_norm: logits equal within 1e-6 relative ({error:.2e})")
    ema_before = logits_of(original, images, ema_params(state))
    ema_after = logits_of(grown, images, ema_params(grown_state))
    error = relative_error(ema_after, ema_before)
    check(error < 1e-6, f"and the EMA weights' logits too ({error:.2e})")

    changed = os.path.join(SCRATCH, "random.safetensors")
    result = run([BINARY, "scale", "--ckpt", original, "--out", changed, "--factor", "2", "--key-init", "random",
                  "--norm", "current", "--seed", "3"])
    check(result.returncode == 0 and "does NOT preserve the function" in result.stdout,
          "--key-init random --norm current: the command says it does not preserve the function")
    error = relative_error(logits_of(changed, images), before)
    check(error > 1e-2, f"and the logits change ({error:.2e})")


def test_refusals(original):
    print("refusals")
    refused = os.path.join(SCRATCH, "refused.safetensors")
    result = run([BINARY, "scale", "--ckpt", original, "--out", refused, "--attn-tokens", "48", "--ffn-tokens", "192"],
                 expect=2)
    check(result.returncode == 2 and "only grow" in result.stdout and not os.path.exists(refused),
          f"an equal size is refused: {result.stdout.strip()}")


def test_continue(first_run, grown, grown_state, original, state):
    """The continuation of the grown model and of the model before growth start on the same batch
    with the same drop-path draws (same seed, fresh schedule): equal functions, equal first loss."""
    print("training continues from the grown model")
    continued = os.path.join(SCRATCH, "continued")
    result = run(train_command(continued, ["--init-from", grown, "--init-state", grown_state, "--max-steps", "3"]))
    check(result.returncode == 0, f"train --init-from --init-state exits 0 (got {result.returncode})")
    baseline = os.path.join(SCRATCH, "continued_small")
    run(train_command(baseline, ["--init-from", original, "--init-state", state, "--max-steps", "1"]))
    losses, baseline_losses, before = train_losses(continued), train_losses(baseline), train_losses(first_run)
    if not losses or not baseline_losses:
        check(False, "both continuations logged losses")
        return
    check(len(losses) == 3, f"3 steps logged ({len(losses)})")
    check(abs(losses[0] - baseline_losses[0]) <= 1e-4 * baseline_losses[0],
          f"first loss {losses[0]:.6f} equals the un-grown model's on the same batch {baseline_losses[0]:.6f}")
    check(abs(losses[0] - before[-1]) < 0.25 * before[-1],
          f"first loss {losses[0]:.4f} close to the last loss before growth {before[-1]:.4f}")


def main():
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH)
    prepared = run([BINARY, "prepare", "fashion-mnist", "--out", DATA])
    if prepared.returncode != 0:
        print("cannot prepare Fashion-MNIST (apt-get install dataset-fashion-mnist)")
        return 1
    first_run = os.path.join(SCRATCH, "small")
    result = run(train_command(first_run))
    check(result.returncode == 0, f"one epoch of the small model exits 0 (got {result.returncode})")
    original, state = os.path.join(first_run, "model.safetensors"), os.path.join(first_run, "state.safetensors")
    grown_dir = os.path.join(SCRATCH, "grown")
    os.makedirs(grown_dir)
    grown, grown_state = os.path.join(grown_dir, "model.safetensors"), os.path.join(grown_dir, "state.safetensors")
    result = run([BINARY, "scale", "--ckpt", original, "--out", grown, "--factor", "2", "--state", state,
                  "--out-state", grown_state])
    check(result.returncode == 0, f"scale --factor 2 --state exits 0 (got {result.returncode})")
    if failures:
        return 1

    images = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    test_grown_file(original, grown, result.stdout)
    test_grown_state(state, grown_state)
    test_logits(original, grown, state, grown_state, images)
    print("eval")
    before, after = top1(original), top1(grown)
    check(before.startswith("top-1: ") and before == after, f"top-1 unchanged: '{before}' and '{after}'")
    test_refusals(original)
    test_continue(first_run, grown, grown_state, original, state)
    shutil.rmtree(DATA, ignore_errors=True)
    return exit_status("test_scale_end_to_end")


if __name__ == "__main__":
    sys.exit(main())
