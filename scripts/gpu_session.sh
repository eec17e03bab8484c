#!/usr/bin/env bash
# One batched session on a lent GPU machine (the workplace's device tool: Ubuntu, CUDA, cuDNN,
# PyTorch, no internet, and none of TurboJPEG, stb, libyaml, cJSON or OpenBLAS-OpenMP). Their
# Debian packages travel in .deps/debs and Fashion-MNIST's source files in .deps/fashion-mnist
# (fill them with `scripts/gpu_session.sh fetch` on a Debian machine); the packages are unpacked
# into a private prefix there. The real-loader run reads data/imagenet-like (made here with
# `tokenformer prepare imagenet-like --out data/imagenet-like --count 1500`, carried as it is).
#
#   scripts/gpu_session.sh fetch                    # here: download what the GPU machine lacks
#   scripts/gpu_session.sh build test parity bench demo   # there: any of these, in order
#
# Logs of each stage go to $OUT (the device tool brings them back); the summary lines go to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tokenformer-gpu}
mkdir -p "$OUT"
deps=/tmp/tokenformer-deps
build=build-gpu
fmnist=/tmp/tokenformer-fmnist # Fashion-MNIST as an ImageFolder tree (prepare)
python=${PYTHON:-python3}

stage_fetch() {
    mkdir -p .deps/debs .deps/fashion-mnist
    (cd .deps/debs && apt-get download libturbojpeg0 libturbojpeg0-dev libstb0 libstb-dev libyaml-0-2 libyaml-dev \
        libcjson1 libcjson-dev libopenblas0-openmp libopenblas-openmp-dev)
    cp /usr/share/datasets/fashion-mnist/*.gz .deps/fashion-mnist/
}

environment() {
    if [[ ! -d $deps ]]; then
        mkdir -p $deps
        for package in .deps/debs/*.deb; do dpkg -x "$package" $deps; done
    fi
    export PKG_CONFIG_PATH=$deps/usr/lib/x86_64-linux-gnu/pkgconfig:$deps/usr/share/pkgconfig
    export PKG_CONFIG_SYSROOT_DIR=$deps
    export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu/openblas-openmp:$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
    export NCCL_NVLS_ENABLE=0
}

stage_build() {
    local start=$SECONDS
    cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DTOKENFORMER_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DCMAKE_PREFIX_PATH=$deps/usr \
        -DCBLAS_INCLUDE_DIR=$deps/usr/include/x86_64-linux-gnu/openblas-openmp \
        -DCBLAS_LIBRARY=$deps/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so >"$OUT/cmake.log" 2>&1 ||
        { tail -30 "$OUT/cmake.log"; return 1; }
    cmake --build $build -j"$(nproc)" >"$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -40; return 1; }
    echo "build: $((SECONDS - start)) s, $(grep -c warning "$OUT/build.log") warning lines"
}

stage_test() {
    {
        timeout 300 $build/test_kernels_cuda
        # NCCL through a one-rank communicator (a multi-GPU machine runs it under a launcher).
        timeout 120 $build/dist_allreduce_check
    } >"$OUT/test.log" 2>&1
    local status=$?
    grep -E "FAIL|SKIP|checks|attention|OK:|GB/s" "$OUT/test.log" | head -40
    return $status
}

stage_parity() {
    timeout 120 $python tests/test_torch_parity.py $build/tokenformer /tmp/tokenformer-parity cuda >"$OUT/parity.log" 2>&1
    local status=$?
    grep -E "FAIL|failure|logits|loss  " "$OUT/parity.log" | head -20
    return $status
}

stage_parity_b16() {
    timeout 300 $python tests/test_torch_parity.py $build/tokenformer /tmp/tokenformer-parity cuda b16 \
        >"$OUT/parity_b16.log" 2>&1
    local status=$?
    sed -n '/parity case b16/,$p' "$OUT/parity_b16.log" | grep -E "autocast|logits|loss  |grad  |PASS|FAIL" | head -12
    return $status
}

stage_bench() {
    {
        timeout 120 $build/bench_kernels_cuda
        $build/tokenformer bench train --config configs/tokenformer_b16.yaml --batch 256 --steps 20 --warmup 3
        $build/tokenformer bench infer --config configs/tokenformer_b16.yaml --batch 512 --steps 20 --warmup 3
        $build/tokenformer bench train --config configs/tokenformer_l16.yaml --batch 128 --steps 10 --warmup 3
    } >"$OUT/bench.log" 2>&1
    local status=$?
    grep -E "bench|img/s|TFLOP|memory|ms" "$OUT/bench.log" | tail -40
    return $status
}

# Inference alone (issue 6): the kernel benchmark's attention lines and B/16 `bench infer`.
stage_infer() {
    {
        timeout 120 $build/bench_kernels_cuda
        $build/tokenformer bench infer --config configs/tokenformer_b16.yaml --batch 512 --steps 30 --warmup 3
    } >"$OUT/infer.log" 2>&1
    local status=$?
    grep -E "attention|img/s|ms" "$OUT/infer.log" | tail -24
    return $status
}

stage_demo() {
    local run=/tmp/tokenformer-runs/fmnist_tiny
    rm -rf $run
    {
        $build/tokenformer prepare fashion-mnist --source .deps/fashion-mnist --out $fmnist &&
            $build/tokenformer train --config configs/fmnist_tiny.yaml --data $fmnist --out $run &&
            $build/tokenformer eval --ckpt $run/model.safetensors --data $fmnist
    } >"$OUT/demo.log" 2>&1
    local status=$?
    grep -E "img/s|top-1|error" "$OUT/demo.log" | tail -15
    cp $run/metrics.jsonl "$OUT/fmnist_tiny_metrics.jsonl" 2>/dev/null
    return $status
}

# B/16 on the ImageNet-like set with the real loader (issue 5): throughput against `bench train`,
# then kill -9 during a run and resume, comparing the losses with the uninterrupted run's.
# Ten hard-linked copies of each training image of data/imagenet-like: epochs of 21 to 52 steps
# instead of 2 to 5, so that epoch ends (loader restart, checkpoint) are as rare as in a real run;
# the decode work per image is the same.
big=/tmp/imagenet-like-x10
make_big_imagenet() {
    local source=data/imagenet-like
    [[ -d $big ]] && return 0
    for class_dir in $source/train/*/; do
        local class=$(basename "$class_dir")
        mkdir -p $big/train/$class $big/val/$class
        for copy in 0 1 2 3 4 5 6 7 8 9; do
            for file in "$class_dir"*; do ln "$file" "$big/train/$class/c${copy}_$(basename "$file")"; done
        done
        ln $source/val/$class/* $big/val/$class/
    done
}

stage_imagenet() {
    local runs=/tmp/tokenformer-runs
    rm -rf $runs/b16 $runs/b16_killed
    make_big_imagenet
    local common=(--config configs/tokenformer_b16.yaml --data $big --set model.classes=10
                  --set schedule.batch=256 --set schedule.micro_batch=256 --set data.workers=15
                  --set run.log_every=10 --set run.eval_every=0 --set run.ckpt_every=50)
    {
        $build/tokenformer bench train --config configs/tokenformer_b16.yaml --set model.classes=10 --batch 256 --steps 20
        $build/tokenformer train "${common[@]}" --out $runs/b16 --max-steps 120
        $build/tokenformer train "${common[@]}" --out $runs/b16_killed --max-steps 120 &
        local pid=$!
        while [[ ! -d $runs/b16_killed/checkpoint-00000050 ]] && kill -0 $pid 2>/dev/null; do sleep 0.5; done
        sleep 3
        kill -9 $pid
        wait $pid
        echo "killed with SIGKILL after $(tail -1 $runs/b16_killed/metrics.jsonl)"
        $build/tokenformer train --resume $runs/b16_killed --max-steps 120
        $python - $runs/b16/metrics.jsonl $runs/b16_killed/metrics.jsonl <<'PYTHON'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r["type"] == "train"}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
common = sorted(set(a) & set(b))
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in common)
print(f"kill -9 + resume: {len(common)} logged steps in common, losses equal in {sum(a[s] == b[s] for s in common)},"
      f" largest relative difference {worst:.2e}")
PYTHON
    } >"$OUT/imagenet.log" 2>&1
    local status=$?
    grep -E "img/s|kill|step 200|resum" "$OUT/imagenet.log" | tail -30
    cp $runs/b16/metrics.jsonl "$OUT/b16_imagenet_metrics.jsonl" 2>/dev/null
    return $status
}

# The growth stages' model: fmnist_micro.
micro_config=(--config configs/fmnist_micro.yaml --data $fmnist --set run.log_every=100)

# fmnist_micro trained 3 epochs into $1/small3, then grown to twice the tokens (zero keys, n_norm
# kept, optimizer state carried) into $1/grown.safetensors and $1/grown_state.safetensors.
train_and_grow_micro() {
    local runs=$1
    $build/tokenformer prepare fashion-mnist --source .deps/fashion-mnist --out $fmnist &&
        $build/tokenformer train "${micro_config[@]}" --out $runs/small3 &&
        $build/tokenformer scale --ckpt $runs/small3/model.safetensors --state $runs/small3/state.safetensors \
            --factor 2 --out $runs/grown.safetensors --out-state $runs/grown_state.safetensors
}

# Per run of $1: its validation top-1 by epoch, and its metrics.jsonl kept as $OUT/$2_<run>.jsonl.
report_runs() {
    local runs=$1 prefix=$2
    shift 2
    for run in "$@"; do
        $python - $run $runs/$run/metrics.jsonl <<'PYTHON'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[2])) if r["type"] == "eval"]
print(f"{sys.argv[1]:7s} top-1 by epoch: " + "  ".join(f"{r['top1']:.2f}" for r in evals))
PYTHON
        cp $runs/$run/metrics.jsonl "$OUT/${prefix}_$run.jsonl"
    done
}

# Issue 7 on fmnist_micro: 3 epochs, grow to twice the tokens (zero keys, n_norm kept, optimizer
# state carried), 3 more epochs; against the small model and the large one trained 6 epochs.
stage_growth() {
    local runs=/tmp/tokenformer-growth
    rm -rf $runs && mkdir -p $runs
    {
        train_and_grow_micro $runs &&
        $build/tokenformer eval --ckpt $runs/small3/model.safetensors --data $fmnist &&
        $build/tokenformer eval --ckpt $runs/grown.safetensors --data $fmnist &&
        $build/tokenformer train "${micro_config[@]}" --out $runs/grown3 --set schedule.warmup_epochs=0 \
            --init-from $runs/grown.safetensors --init-state $runs/grown_state.safetensors &&
        $build/tokenformer train "${micro_config[@]}" --out $runs/small6 --set schedule.epochs=6 &&
        $build/tokenformer train "${micro_config[@]}" --out $runs/large6 --set schedule.epochs=6 \
            --set model.n_attn=192 --set model.n_ffn=768
    } >"$OUT/growth.log" 2>&1
    local status=$?
    report_runs $runs growth small3 grown3 small6 large6
    grep -E "^top-1|function" "$OUT/growth.log"
    return $status
}

# The same growth, continued at a lower peak learning rate (2e-4, warmup 0) with the optimizer
# state carried and with a fresh optimizer: what the carried state itself contributes.
stage_growth_lr() {
    local runs=/tmp/tokenformer-growth-lr
    local continued=(--set schedule.warmup_epochs=0 --set optimizer.lr=2e-4 --init-from $runs/grown.safetensors)
    rm -rf $runs && mkdir -p $runs
    {
        train_and_grow_micro $runs &&
        $build/tokenformer train "${micro_config[@]}" --out $runs/carried "${continued[@]}" \
            --init-state $runs/grown_state.safetensors &&
        $build/tokenformer train "${micro_config[@]}" --out $runs/fresh "${continued[@]}"
    } >"$OUT/growth_lr.log" 2>&1
    local status=$?
    report_runs $runs growth_lr small3 carried fresh
    return $status
}

# Issue 7 on B/16 and issue 6's eval throughput: train on the ImageNet-like set, grow to
# 1024/4096 tokens, the loss on the same images before and after, training continued, and the
# grown model's speed.
stage_b16growth() {
    local runs=/tmp/tokenformer-b16growth
    rm -rf $runs && mkdir -p $runs
    make_big_imagenet
    local common=(--config configs/tokenformer_b16.yaml --data $big --set model.classes=10 --set data.workers=15
                  --set schedule.batch=256 --set schedule.micro_batch=256 --set run.log_every=25
                  --set run.eval_every=0 --set run.ckpt_every=0 --set run.keep_checkpoints=1)
    {
        $build/tokenformer train "${common[@]}" --out $runs/b16 --max-steps 100 &&
        $build/tokenformer eval --ckpt $runs/b16/model.safetensors --data $big --split train --batch 256 &&
        $build/tokenformer scale --ckpt $runs/b16/model.safetensors --state $runs/b16/state.safetensors \
            --attn-tokens 1024 --ffn-tokens 4096 --out $runs/grown.safetensors --out-state $runs/grown_state.safetensors &&
        $build/tokenformer eval --ckpt $runs/grown.safetensors --data $big --split train --batch 256 &&
        $build/tokenformer train "${common[@]}" --out $runs/grown --max-steps 50 --set schedule.warmup_epochs=0 \
            --init-from $runs/grown.safetensors --init-state $runs/grown_state.safetensors &&
        $build/tokenformer bench train --config configs/tokenformer_b16.yaml --set model.n_attn=1024 \
            --set model.n_ffn=4096 --batch 256 --steps 10
    } >"$OUT/b16growth.log" 2>&1
    local status=$?
    grep -E "images/s|^loss|^top-1|function|img/s|GiB" "$OUT/b16growth.log" | tail -24
    return $status
}

status=0
for stage in "$@"; do
    [[ $stage == fetch ]] || environment
    echo "== $stage"
    "stage_$stage" || { status=1; echo "stage $stage failed (logs in $OUT)"; }
done
exit $status
