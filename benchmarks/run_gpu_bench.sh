#!/usr/bin/env bash
# Run benchmarks/bench_gpu.py on a CUDA machine in a fresh virtual environment, in one call.
#
#   benchmarks/run_gpu_bench.sh --prepare        # here, with network: fill out/gpu_carry/
#   benchmarks/run_gpu_bench.sh [bench_gpu.py options]   # there: set up, then bench
#
# The set-up is scripts/setup_env.sh's, reduced to what the algorithm core needs and with a CUDA
# torch, and it works offline or online:
#  1. a fresh venv in $VENV (default /tmp/nbr_gpu_venv; removed first);
#  2. torch: the base interpreter's own torch when it sees a GPU (device images ship a CUDA torch
#     and have no network), layered under the venv like --system-site-packages, also when the
#     base interpreter is itself a venv; otherwise pip's CUDA wheel from $TORCH_INDEX_URL;
#  3. numpy scipy pyyaml tqdm trimesh libigl: whatever the base already has, the rest from the
#     wheels in $WHEELS (default out/gpu_carry/wheels, made by --prepare for Python
#     $PY_VERSION), else from PyPI;
#  4. the package itself from src/ (PYTHONPATH: no build step, nothing written to the tree).
# Then the bench runs under `timeout`, with --budget-s set so that the whole call ends within
# $LIMIT_S seconds (default 460: under 8 minutes, set-up included). The data is
# ../shared/data/ultrabones_hip where it exists, else out/gpu_carry/ultrabones_hip (copied by
# --prepare: ../shared does not travel to a device machine); the JSON goes to $OUT (the device
# machine's output folder) or out/, as bench_gpu.json, unless --json is given.
#
# On the device machine (tool `run`), after --prepare here:
#   run(command='benchmarks/run_gpu_bench.sh', carry=['out/gpu_carry'], timeout_s=540)
set -euo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/nbr_gpu_venv}
PYTHON=${PYTHON:-python3}
CARRY=${CARRY:-out/gpu_carry}
WHEELS=${WHEELS:-$CARRY/wheels}
PY_VERSION=${PY_VERSION:-3.12}
LIMIT_S=${LIMIT_S:-460}
#: Seconds kept back from the bench's budget: imports, the row running when it is spent, and
#: the final table.
RESERVE_S=${RESERVE_S:-70}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
DEPS=(numpy scipy yaml:pyyaml tqdm trimesh igl:libigl)

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
        --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" libigl trimesh
    if [ -d ../shared/data/ultrabones_hip ]; then
        rm -rf "$CARRY/ultrabones_hip"
        cp -r ../shared/data/ultrabones_hip "$CARRY/ultrabones_hip"
        chmod -R u+w "$CARRY/ultrabones_hip"
    fi
    du -sh "$CARRY"
    echo "ready: carry $CARRY (ignored by git) and run benchmarks/run_gpu_bench.sh there"
    exit 0
fi

echo "== set-up: fresh venv $VENV"
rm -rf "$VENV"
if ! "$PYTHON" -m venv --system-site-packages "$VENV"; then  # no ensurepip: pip from the base
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
fi
PY="$VENV/bin/python"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pip_install() {
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --disable-pip-version-check -q "$@"
    else
        "$PYTHON" -m pip install --disable-pip-version-check -q --target "$SITE" "$@"
    fi
}
# A CUDA torch, unless the bench is asked to run on the CPU (the local smoke run).
case " $* " in *" --device cpu "*) need_cuda=0;; *) need_cuda=1;; esac
torch_state() {  # prints "VERSION CUDA(0/1)", or nothing without torch
    "$1" -c 'import torch; print(torch.__version__, int(torch.cuda.is_available()))' \
        2>/dev/null || true
}
usable() { [ -n "$1" ] && { [ "$need_cuda" = 0 ] || [ "${1##* }" = 1 ]; }; }
state=$(torch_state "$PY")
if ! usable "$state" && usable "$(torch_state "$PYTHON")"; then
    # The base interpreter is a venv (its packages are not the "system" ones): layer them in.
    "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$SITE/_base_site.pth"
    state=$(torch_state "$PY")
fi
if usable "$state"; then
    echo "torch: the base interpreter's (${state% *})"
else
    echo "torch: none usable in the base interpreter; installing one from $TORCH_INDEX_URL"
    pip_install torch --index-url "$TORCH_INDEX_URL"
fi
missing=$("$PY" -c '
import importlib.util, sys
pairs = [d.split(":") for d in sys.argv[1:]]
print(" ".join(p[-1] for p in pairs if importlib.util.find_spec(p[0]) is None))
' "${DEPS[@]}")
if [ -n "$missing" ]; then
    echo "installing $missing"
    if [ -d "$WHEELS" ]; then
        # Offline: exactly the missing ones (their own needs, numpy and scipy, are in the base).
        # shellcheck disable=SC2086
        pip_install --no-index --no-deps --find-links "$WHEELS" $missing
    else
        # shellcheck disable=SC2086
        pip_install $missing
    fi
fi

args=("$@")
case " ${args[*]-} " in *" --data "*) ;; *)
    if [ -d ../shared/data/ultrabones_hip ]; then data=../shared/data/ultrabones_hip
    else data=$CARRY/ultrabones_hip; fi
    args+=(--data "$data");;
esac
case " ${args[*]} " in *" --json "*) ;; *) args+=(--json "${OUT:-out}/bench_gpu.json");; esac
left=$((LIMIT_S - ($(date +%s) - START)))
budget=$((left - RESERVE_S))
if [ $budget -le 0 ]; then
    echo "no time left for the bench after the set-up ($left s of $LIMIT_S s)" >&2
    exit 1
fi
echo "== bench: budget $budget s, hard limit $left s (set-up took $((LIMIT_S - left)) s)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout -k 10 "$left" "$PY" benchmarks/bench_gpu.py --budget-s "$budget" "${args[@]}"
