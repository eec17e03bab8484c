#!/usr/bin/env bash
# Installs the Debian packages the build needs (and, with "test", those the tests need), skipping
# what is already installed, then configures and builds into build/. Used by demo.sh and test.sh.
#
#   scripts/setup.sh [demo|test]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config zlib1g-dev libturbojpeg0-dev libstb-dev libyaml-dev
          libcjson-dev libopenblas-openmp-dev dataset-fashion-mnist gnuplot-nox)
if [[ "${1:-demo}" == test ]]; then
    # The independent references of the tests: PyTorch, torchvision and PIL from Debian, djpeg/cjpeg,
    # and real photographs for the loader's benchmark set.
    packages+=(python3-torch python3-torchvision python3-pil python3-numpy libjpeg-turbo-progs mate-backgrounds)
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The CUDA backend: the tests build it whenever the CUDA toolkit is there (it compiles without a
# GPU, and its tests then skip); the demo only when there is a GPU to run it on.
cuda=OFF
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"
    if [[ "${1:-demo}" == test ]] || (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
        cuda=ON
    fi
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DTOKENFORMER_CUDA="$cuda" >/dev/null
if ! cmake --build build -j"$(nproc)" >build/build.log 2>&1; then
    cat build/build.log
    echo "setup: the build failed (log above, also in build/build.log)" >&2
    exit 1
fi
grep -E "warning:" build/build.log || true
