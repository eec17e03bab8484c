#!/usr/bin/env bash
# The demo: sets up, prepares Fashion-MNIST as an ImageFolder tree of JPEGs, trains a small
# TokenFormer on it (fmnist_tiny on a GPU, fmnist_micro on the CPU: about 10 minutes on 2 cores),
# evaluates the final checkpoint and ends with its top-1 accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo

data=data/fashion-mnist
build/tokenformer prepare fashion-mnist --out "$data"

config=fmnist_micro
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && grep -q "TOKENFORMER_CUDA:BOOL=ON" build/CMakeCache.txt; then
    config=fmnist_tiny
fi
run=runs/demo_$config
rm -rf "$run" # the demo starts over; real runs continue with --resume
build/tokenformer train --config configs/$config.yaml --data "$data" --out "$run"
build/tokenformer eval --ckpt "$run/model.safetensors" --data "$data"
