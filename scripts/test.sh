#!/usr/bin/env bash
# Sets up and runs every test: the C unit tests, the finite-difference checks, the PyTorch/PIL/
# torchvision reference comparisons and the end-to-end CPU tests. GPU tests print one SKIP line
# when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 1500
