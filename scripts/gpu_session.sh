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
#   scripts/gpu_session.sh build multi_bench multi_train multi_eval multi_kill   # on 2 or more GPUs
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
    if [[ ! -f $deps/unpacked ]]; then # a marker: a run without .deps/debs must not leave it half made
        mkdir -p $deps
        for package in .deps/debs/*.deb; do dpkg -x "$package" $deps || return 1; done
        touch $deps/unpacked
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

# Per-kernel times of one B/16 inference batch (Nsight Compute, clocks left alone): which
# kernels the profile's classes are made of.
stage_kernel_times() {
    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        $build/tokenformer bench infer --config configs/tokenformer_b16.yaml --batch 512 --steps 1 --warmup 1 \
        >"$OUT/ncu_infer.csv" 2>"$OUT/ncu_infer.err"
    local status=$?
    $python scripts/experiments/kernel_times.py "$OUT/ncu_infer.csv" | tee "$OUT/kernel_times.txt" | head -40
    return $status
}

# SM clock and power under a sustained B/16 inference run (150 batches), sampled every 200 ms:
# whether the GPU runs at its power limit rather than its top clock.
stage_clocks() {
    nvidia-smi --query-gpu=clocks.sm,power.draw,power.limit --format=csv,noheader,nounits -lms 200 \
        >"$OUT/clocks.csv" &
    local sampler=$!
    $build/tokenformer bench infer --config configs/tokenformer_b16.yaml --batch 512 --steps 150 --warmup 3 \
        >"$OUT/clocks_bench.log" 2>&1
    local status=$?
    kill $sampler
    grep img/s "$OUT/clocks_bench.log"
    awk -F', ' '$2 > 300 { n++; clock += $1; power += $2; limit = $3 }
        END { if (n) printf "under load (> 300 W): %d samples, SM clock %.0f MHz, power %.0f W of %.0f W\n",
                             n, clock / n, power / n, limit }' "$OUT/clocks.csv"
    return $status
}

# Evaluation with the real loader (issue 6): a B/16 checkpoint of 10 classes after two steps,
# evaluated over the ImageNet-like training images (13500 with the copies) at two batch sizes.
stage_evalspeed() {
    local run=/tmp/tokenformer-runs/b16_eval
    rm -rf $run
    make_big_imagenet
    {
        $build/tokenformer train --config configs/tokenformer_b16.yaml --data $big --set model.classes=10 \
            --set schedule.batch=256 --set schedule.micro_batch=256 --set data.workers=15 --set run.eval_every=0 \
            --out $run --max-steps 2 &&
            $build/tokenformer eval --ckpt $run/model.safetensors --data $big --split train --batch 256 &&
            $build/tokenformer eval --ckpt $run/model.safetensors --data $big --split train --batch 512
    } >"$OUT/evalspeed.log" 2>&1
    local status=$?
    grep -E "^images|top-1|error" "$OUT/evalspeed.log" | tail -10
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

# $1: a label; the training losses of the run whose metrics.jsonl is $3 against those of $2, at
# the steps both logged (up to step $4 when given): how many are equal and the largest relative
# difference.
compare_losses() {
    $python - "$@" <<'PYTHON'
import json, sys
label, reference, other = sys.argv[1:4]
last = int(sys.argv[4]) if len(sys.argv) > 4 else None
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r["type"] == "train"}
a, b = losses(reference), losses(other)
steps = [s for s in sorted(set(a) & set(b)) if last is None or s <= last]
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
print(f"{label}: steps {steps[0]}..{steps[-1]} ({len(steps)} in common), losses equal in "
      f"{sum(a[s] == b[s] for s in steps)}, largest relative difference {worst:.2e}")
PYTHON
}

# "step<TAB>loss" of each training record of run directory $1.
losses_by_step() {
    $python -c 'import json, sys
for r in map(json.loads, open(sys.argv[1] + "/metrics.jsonl")):
    if r["type"] == "train": print("%d\t%.6f" % (r["step"], r["loss"]))' "$1"
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
        compare_losses "kill -9 + resume" $runs/b16/metrics.jsonl $runs/b16_killed/metrics.jsonl
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

# ---- several GPUs (issue 8): run on a machine of 2 or more ------------------------------------

gpus=0
count_gpus() { gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); }

# One rank per GPU with torchrun-style variables set by hand (what a cluster's own launcher does);
# each rank is ended after 400 s, so that a hang cannot take the whole session.
ranks_by_hand() { # PORT COMMAND...
    local port=$1 pids=() status=0
    shift
    for ((rank = 0; rank < gpus; rank++)); do
        RANK=$rank WORLD_SIZE=$gpus LOCAL_RANK=$rank LOCAL_WORLD_SIZE=$gpus MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$port timeout 400 "$@" &
        pids+=($!)
    done
    for rank in "${!pids[@]}"; do
        wait "${pids[$rank]}" && continue
        status=$?
        echo "ranks_by_hand: rank $rank exited with code $status"
    done
    return $status
}
ranks_torchrun() { # PORT COMMAND...
    local port=$1
    shift
    $python -m torch.distributed.run --nproc_per_node "$gpus" --master_port "$port" --no_python "$@"
}
ranks_mpirun() { # PORT COMMAND...
    local port=$1
    shift
    mpirun --allow-run-as-root -np "$gpus" -x NCCL_NVLS_ENABLE=0 -x MASTER_PORT=$port "$@"
}

# B/16 on the ImageNet-like set, without mixup, CutMix and drop path: their draws are made per
# micro-batch (per rank), so with them one GPU and two would see different random mixes.
multi_common=(--config configs/tokenformer_b16.yaml --data $big --set model.classes=10 --set data.workers=15
              --set schedule.batch=256 --set schedule.warmup_epochs=1 --set optimizer.lr=5e-4
              --set augmentation.mixup=0 --set augmentation.cutmix=0 --set model.drop_path=0
              --set run.log_every=1 --set run.eval_every=0 --set run.keep_checkpoints=2)
multi_runs=/tmp/tokenformer-multi

# The NCCL checks, the launchers, and bench train on 1 GPU and on all of them.
stage_multi_bench() {
    count_gpus
    {
        nvidia-smi topo -m
        echo "== dist_allreduce_check on $gpus ranks"
        ranks_by_hand 29510 $build/dist_allreduce_check
        echo "dist_allreduce_check exit $?"
        echo "== dist_allreduce_check --abort-rank 1"
        ranks_by_hand 29511 $build/dist_allreduce_check --abort-rank 1
        echo "dist_allreduce_check --abort-rank 1 exit $? (1 expected)"
        echo "== launchers"
        timeout 240 $python tests/test_dist_launchers.py $build/tokenformer /tmp/tokenformer-launchers
        echo "== bench train, 1 GPU"
        $build/tokenformer bench train --config configs/tokenformer_b16.yaml --batch 256 --steps 30 --warmup 5
        echo "== bench train, $gpus GPUs"
        ranks_by_hand 29512 $build/tokenformer bench train --config configs/tokenformer_b16.yaml --batch 256 \
            --steps 30 --warmup 5
    } >"$OUT/multi_bench.log" 2>&1
    local status=$?
    grep -E "GPU[0-9]|OK|FAIL|checks|GB/s|exit|abort|ok |SKIP|failure|== |img/s|all-reduce|overlapped|memory in use" \
        "$OUT/multi_bench.log" | head -60
    $python - "$OUT/multi_bench.log" <<'PYTHON'
import re, sys
text = open(sys.argv[1]).read()
one = re.search(r"== bench train, 1 GPU.*?([\d.]+) img/s", text, re.S)
many = re.search(r"== bench train, (\d+) GPUs.*?([\d.]+) img/s in all, ([\d.]+) img/s per GPU", text, re.S)
if one and many:
    single, world, per_gpu = float(one.group(1)), int(many.group(1)), float(many.group(3))
    print(f"scaling 1 -> {world} GPUs: {single:.0f} -> {per_gpu:.0f} img/s per GPU, efficiency {100 * per_gpu / single:.1f}%")
PYTHON
    return $status
}

# 1 GPU x 256 against all GPUs x 256/gpus for 40 steps, with 1 GPU x 2 micro-batches of 128 as the
# control (the same sum in another order: what bf16 rounding alone does to the losses).
stage_multi_train() {
    count_gpus
    make_big_imagenet
    rm -rf $multi_runs && mkdir -p $multi_runs
    {
        $build/tokenformer train "${multi_common[@]}" --set schedule.micro_batch=256 --out $multi_runs/one --max-steps 40
        $build/tokenformer train "${multi_common[@]}" --set schedule.micro_batch=128 --out $multi_runs/one_accum --max-steps 40
        ranks_by_hand 29513 $build/tokenformer train "${multi_common[@]}" --set schedule.micro_batch=$((256 / gpus)) \
            --out $multi_runs/many --max-steps 40
    } >"$OUT/multi_train.log" 2>&1
    local status=$?
    grep -E "bit-identical|differ|batch 256 =|error|failed" "$OUT/multi_train.log" | head -20
    for last in 20 40; do
        compare_losses "1 GPU, 2 x 128 (control) against 1 GPU x 256" $multi_runs/one/metrics.jsonl \
            $multi_runs/one_accum/metrics.jsonl $last
        compare_losses "$gpus GPUs x $((256 / gpus)) against 1 GPU x 256" $multi_runs/one/metrics.jsonl \
            $multi_runs/many/metrics.jsonl $last
    done
    echo "losses by step (1 GPU x 256, control, $gpus GPUs):"
    paste <(losses_by_step $multi_runs/one) <(losses_by_step $multi_runs/one_accum | cut -f2) \
        <(losses_by_step $multi_runs/many | cut -f2)
    cp $multi_runs/many/metrics.jsonl "$OUT/multi_many_metrics.jsonl" 2>/dev/null
    return $status
}

# Evaluation of the several-GPU run's checkpoint on 1 GPU and on all of them.
stage_multi_eval() {
    count_gpus
    make_big_imagenet
    local checkpoint=$multi_runs/many/model.safetensors
    {
        for split in train val; do
            echo "== eval $split, 1 GPU"
            $build/tokenformer eval --ckpt $checkpoint --data $big --split $split --batch 256
            echo "== eval $split, $gpus GPUs"
            ranks_by_hand 29514 $build/tokenformer eval --ckpt $checkpoint --data $big --split $split --batch 256
        done
    } >"$OUT/multi_eval.log" 2>&1
    local status=$?
    grep -E "== |^images|^top-[15]|^loss|^data wait|error" "$OUT/multi_eval.log"
    return $status
}

# Each launcher: kill -9 rank 1 as soon as the checkpoint of step 10 is there; every rank must stop
# with the failure, and --resume under the same launcher must finish the 40 steps with the losses
# of the uninterrupted run (stage_multi_train's "many").
kill_and_resume() { # LAUNCHER PORT
    local launcher=$1 port=$2 run=$multi_runs/kill_$1
    local rank_variable=RANK
    [[ $launcher == mpirun ]] && rank_variable=OMPI_COMM_WORLD_RANK
    rm -rf $run
    local train=($build/tokenformer train "${multi_common[@]}" --set schedule.micro_batch=$((256 / gpus))
                 --set run.ckpt_every=10)
    ranks_$launcher $port "${train[@]}" --out $run --max-steps 40 &
    local launched=$!
    local waited=0
    while [[ ! -d $run/checkpoint-00000010 ]] && kill -0 $launched 2>/dev/null && ((waited < 1200)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    local victim=""
    for pid in $(pgrep -f "tokenformer train"); do # the rank itself, not its launcher or timeout
        [[ $(readlink /proc/$pid/exe) == */tokenformer ]] &&
            tr '\0' '\n' </proc/$pid/environ 2>/dev/null | grep -qx "$rank_variable=1" && victim=$pid
    done
    local killed_at=$SECONDS
    echo "$launcher: killing rank 1 (pid ${victim:-none found}) with SIGKILL after: $(tail -1 $run/metrics.jsonl)"
    [[ -n $victim ]] && kill -9 $victim
    wait $launched
    echo "$launcher: the launch ended with exit code $? $((SECONDS - killed_at)) s after the kill"
    sleep 1
    echo "$launcher: processes of the run left: $(pgrep -x tokenformer | wc -l)"
    ranks_$launcher $((port + 2)) $build/tokenformer train --resume $run --max-steps 40
    echo "$launcher: the resumed launch ended with exit code $?"
    compare_losses "$launcher: killed and resumed run against the uninterrupted one" \
        $multi_runs/many/metrics.jsonl $run/metrics.jsonl
}

stage_multi_kill() {
    count_gpus
    local launchers=(by_hand torchrun)
    command -v mpirun >/dev/null && launchers+=(mpirun)
    local port=29520
    {
        for launcher in "${launchers[@]}"; do
            echo "== $launcher"
            kill_and_resume $launcher $port
            port=$((port + 10))
        done
    } >"$OUT/multi_kill.log" 2>&1
    local status=$?
    grep -E "== |killing|exit code|exited|left|failed|disappeared|closed|against|parameters|resuming" "$OUT/multi_kill.log" | head -60
    return $status
}

status=0
for stage in "$@"; do
    [[ $stage == fetch ]] || environment
    echo "== $stage"
    "stage_$stage" || { status=1; echo "stage $stage failed (logs in $OUT)"; }
done
exit $status
