#!/usr/bin/env bash
# The checks for the first CUDA GPU lent to this project, as ONE command: the CUDA tests, the training
# benchmark (figures for benchmarks/RESULTS.md) and the model cost on the GPU. Every step has its own
# timeout and the script goes on after a failing one; $OUT (default ./device-out) gets one log per
# step, the benchmark's JSON and summary.txt (8 files: the device tool returns at most 8).
#
# 1. Here, before asking for the machine (costs no device time), once per checkout:
#      bash benchmarks/device_check.sh --prepare
#    It writes .whl/ (git-ignored): Python 3.12 wheels of what the device image lacks, at this venv's
#    versions (hydra-core, omegaconf, antlr4-python3-runtime, hydra-submitit-launcher, submitit,
#    pycocotools), and the link .device-data -> ../shared/data (ignored through .git/info/exclude).
#    The device image has its own python3 (3.12) with torch, torchvision, timm, pytest and the rest;
#    .venv cannot travel (7 GB of Python 3.11; the tool carries 64 MiB), nor can NVIDIA DALI (about
#    480 MB installed): there the DALI tests are deselected and the benchmark's DALI row says why.
# 2. The device tool's call:
#      run(command="bash benchmarks/device_check.sh", timeout_s=580,
#          carry=[".whl", ".device-data/imagenet-samples", ".device-data/tinyimagenet-raw-mini"])
#    (the two data folders, 35 MB, travel through the link; without them their tests skip and the
#    benchmark has no DALI row). STEPS="gpu_training model_cost" reruns only those steps.
#
# Steps, expected time on one H100 (not yet measured: estimates) / the timeout each runs under:
#   environment   nvidia-smi, python / torch / CUDA / DALI versions                     ~5 s    /  15 s
#   pytest_cuda   pytest -m cuda: ~70 tests plus tests/test_cuda_e2e.py (compile)      ~2.5 min / 210 s
#   gpu_training  benchmarks/gpu_training.py with its defaults (R-50, batch 256, bf16)  ~1 min  /  80 s
#   gpu_compile   the same with the torch.compile row, 3 rounds (compilation ~1 min)    ~2 min  / 150 s
#   model_cost    benchmarks/model_cost.py --device cuda: R-50 plain / ECA / EMCA-ECA    ~30 s   /  45 s
# about 6 minutes in all, 8.5 at most (500 s of timeouts, a few seconds of wheel installs). scripts/model_summary.py has no device option (it counts
# parameters and FLOPs on the CPU): nothing of it to check on a GPU.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-./device-out}
STEPS=${STEPS:-environment pytest_cuda gpu_training gpu_compile model_cost}
# The packages the device image lacks, as this checkout's venv has them.
WHEELS_BUILT="hydra-core omegaconf antlr4-python3-runtime hydra-submitit-launcher submitit"  # pure Python
WHEELS_BINARY="pycocotools"  # compiled: downloaded for CPython 3.12 on x86-64 Linux

pinned() {
    # pinned PACKAGE...: PACKAGE==<the version this checkout's venv holds>, one per argument
    "$PYTHON_HERE" -c "import sys; from importlib import metadata
print(' '.join(f'{name}=={metadata.version(name)}' for name in sys.argv[1:]))" "$@"
}

prepare() {
    local data exclude
    PYTHON_HERE=${PYTHON_HERE:-.venv/bin/python}
    mkdir -p .whl
    "$PYTHON_HERE" -m pip wheel -q --no-deps -w .whl $(pinned $WHEELS_BUILT) || return 1
    "$PYTHON_HERE" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $(pinned $WHEELS_BINARY) || return 1
    data=${EMCA_SHARED_DATA:-$(cd .. && pwd)/shared/data}
    ln -sfn "$data" .device-data
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.device-data' "$exclude" 2>/dev/null || echo '/.device-data' >>"$exclude"
    ls -l .whl
    du -shL .device-data/imagenet-samples .device-data/tinyimagenet-raw-mini
}

install_wheels() {
    # The carried wheels into /tmp/site, ahead of the image's packages; the checkout itself for `import emca`.
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || echo "installing .whl/ failed: the steps below will name what is missing"
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/ carried (run --prepare here first): hydra-core and the rest must already be installed"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # The carried photographs, where tests/conftest.py and gpu_training.py look for them.
    if [ -d .device-data ]; then export EMCA_SHARED_DATA="$PWD/.device-data"; fi
}

environment() {
    nvidia-smi
    "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
try:
    import nvidia.dali
    print(f"nvidia-dali {nvidia.dali.__version__}")
except ImportError as error:
    print(f"nvidia-dali not importable: {error}")
EOF
}

has_dali() { "$PYTHON" -c "import nvidia.dali" 2>/dev/null; }

pytest_cuda() {
    # Without DALI its tests cannot pass here: deselected by name, and said so.
    local select=()
    has_dali || { select=(-k "not dali"); echo "NVIDIA DALI is not installed: its CUDA tests are deselected (-k 'not dali')"; }
    # Modules importing a package the image lacks (mlflow, DALI, ...) fail to collect; the others still run.
    "$PYTHON" -m pytest -m cuda -q -ra -p no:cacheprovider -p no:xdist --continue-on-collection-errors \
        "${select[@]}" tests
}

gpu_training() { "$PYTHON" benchmarks/gpu_training.py --out "$OUT/gpu_training.json"; }

gpu_compile() { "$PYTHON" benchmarks/gpu_training.py --compile --rounds 3 --out "$OUT/gpu_compile.json"; }

model_cost() {
    "$PYTHON" benchmarks/model_cost.py --device cuda --backbones resnet50 --variants ResNet ECA EMCA-ECA \
        --batch-size 64 --image-size 224 --amp bf16 --channels-last --rounds 10 --steps-per-round 5
}

run_step() {
    # run_step NAME TIMEOUT_S: the function NAME under a timeout, its output in $OUT/NAME.log, a summary line.
    local name=$1 limit=$2 started=$SECONDS rc verdict last
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name (at most ${limit} s)"
    export -f "$name" has_dali
    timeout --kill-after=10 "$limit" bash -c "$name" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 30 "$OUT/$name.log"
    last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-150)
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict=TIMEOUT ;;
        *) verdict=FAIL ;;
    esac
    # pytest exits 1 also for modules it could not import (ERROR <file>, no ::test): told apart from
    # failed tests and errors in a test's setup (ERROR <file>::<test>).
    if [ "$name" = pytest_cuda ] && [ $rc -eq 1 ] && ! grep -qE '[0-9]+ failed' <<<"$last" \
        && ! grep -qE '^ERROR \S+::' "$OUT/$name.log"; then
        verdict="PASS (no test failed; modules that could not be imported here: grep '^ERROR' $name.log)"
    fi
    [ "${verdict%% *}" = PASS ] || FAILED=$((FAILED + 1))
    printf '%-13s %-8s rc=%-3s %4d s  %s\n' "$name" "${verdict%% *}" "$rc" $((SECONDS - started)) "$last" >>"$OUT/summary.txt"
    [ "$verdict" = "${verdict%% *}" ] || echo "              ${verdict#* }" >>"$OUT/summary.txt"
}

main() {
    if [ "${1:-}" = "--prepare" ]; then prepare; return; fi
    mkdir -p "$OUT"
    : >"$OUT/summary.txt"
    FAILED=0
    install_wheels
    export PYTHON OUT PYTHONUNBUFFERED=1
    run_step environment 15
    run_step pytest_cuda 210
    run_step gpu_training 80
    run_step gpu_compile 150
    run_step model_cost 45
    echo "== summary ($SECONDS s in all; logs and JSON in $OUT)"
    cat "$OUT/summary.txt"
    [ "$FAILED" -eq 0 ]
}

main "$@"
