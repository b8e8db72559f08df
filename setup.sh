# Sourced by train.sh, test.sh and tests/run.sh; `source setup.sh` in your own shell works too.
# Finds a CPython 3.7-3.10 (OneFlow 0.9.0 has wheels for no other), makes .venv with the pinned
# requirements (again only when a requirements file changes), and makes OneFlow's CUDA libraries
# loadable here and in every shell that activates the venv.
#
#   source setup.sh                 # then: python3 TrainUnetDataSet.py, python3 -m oneflow.distributed.launch ...
#   PYTHON=/path/to/python3.9 source setup.sh
#   bash setup.sh --torch           # only .venv-torch: CPython 3.11+ with CPU torch, for export_onnx.py --bioimageio

_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_venv="$_repo/.venv"

_python_ok() {  # a CPython between 3.7 and 3.10 with venv
    "$1" -c 'import sys, venv; sys.exit(not ((3, 7) <= sys.version_info[:2] <= (3, 10)))' >/dev/null 2>&1
}

_find_python() {
    local candidates=()
    [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
    candidates+=(python3.10 python3.9 python3.8 python3.7)
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=($(ls -d "$(pyenv root)"/versions/3.{10,9,8,7}.*/bin/python 2>/dev/null | sort -rV))
    fi
    candidates+=(python3)
    local c
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 && _python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

_requirements_hash() {
    cat "$_repo"/requirements*.txt | sha256sum | cut -d' ' -f1  # requirements-onnx.txt too
}

_make_venv() {
    local python
    if ! python="$(_find_python)"; then
        echo "setup.sh: no CPython 3.7-3.10 found (OneFlow 0.9.0 has wheels only for those)." >&2
        echo "setup.sh: install Python 3.10 (e.g. 'apt-get install python3.10 python3.10-venv' or 'pyenv install 3.10')," >&2
        echo "setup.sh: or point PYTHON at one: PYTHON=/path/to/python3.10 bash train.sh" >&2
        return 1
    fi
    if [ -x "$_venv/bin/python" ] && ! _python_ok "$_venv/bin/python"; then
        echo "setup.sh: $_venv is broken or of another Python; recreating it" >&2
        rm -rf "$_venv"
    fi
    if [ ! -x "$_venv/bin/python" ]; then
        echo "setup.sh: creating $_venv with $python ($("$python" -V 2>&1))" >&2
        "$python" -m venv "$_venv" || return 1
    fi
    local want
    want="$(_requirements_hash)"
    if [ "$(cat "$_venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
        echo "setup.sh: installing requirements into $_venv (OneFlow and its CUDA libraries: about 4 GB, once)" >&2
        # A pip config may list local package folders that do not exist; pip's warnings about them are noise.
        "$_venv/bin/python" -m pip install -q --disable-pip-version-check -r "$_repo/requirements-dev.txt" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || return 1
        echo "$want" > "$_venv/.requirements.sha256"
    fi
    local site libs
    site="$("$_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    libs="$site/nvidia/cudnn/lib:$site/nvidia/cublas/lib"
    # OneFlow's CUDA 11.7 build links cuDNN 8 and cuBLAS 11 even on a CPU-only machine, and
    # LD_LIBRARY_PATH is read only at process start, so activate must set it for the bare launcher.
    if ! grep -q "isbi-unet: cuda libs" "$_venv/bin/activate"; then
        cat >> "$_venv/bin/activate" <<EOF

# isbi-unet: cuda libs (added by setup.sh) - OneFlow's CUDA build needs cuDNN 8 / cuBLAS 11 even on CPU
case ":\${LD_LIBRARY_PATH:-}:" in *":$libs:"*) ;; *) export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" ;; esac
EOF
    fi
    # OpenBLAS (OneFlow's CPU convolutions run on its GEMM) picks its kernels by CPU model, and the AVX-512
    # ones of newer CPUs sum in another order: the same seed then trains to other weights on those machines
    # (docs/details.md, "The same numbers on another machine"). Its AVX2 kernels run on every x86-64 CPU since 2013.
    if ! grep -q "isbi-unet: blas kernels" "$_venv/bin/activate"; then
        cat >> "$_venv/bin/activate" <<'EOF'

# isbi-unet: blas kernels (added by setup.sh) - the same OpenBLAS kernels on every x86-64 CPU with AVX2, so a seed trains alike on all
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo 2>/dev/null; then export OPENBLAS_CORETYPE=Haswell; fi
EOF
    fi
    # In activate, not only here, so that `source .venv/bin/activate` alone runs the scripts the same way.
    if ! grep -q "isbi-unet: oneflow on cpu" "$_venv/bin/activate"; then
        cat >> "$_venv/bin/activate" <<'EOF'

# isbi-unet: oneflow on cpu (added by setup.sh) - a value already set is kept
# OneFlow's VM worker busy-waits in sched_yield on CPU, burning a core for nothing.
export ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD="${ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD:-0}"
# No GPU is the expected case for many users; OneFlow's 'CUDA driver' warnings would only alarm them.
export GLOG_minloglevel="${GLOG_minloglevel:-2}"
EOF
    fi
}

# --- bash setup.sh --torch: the side venv that adds PyTorch weights to bioimage.io packages (export_onnx.py
# runs isbi_unet/package_worker.py in it). The project's .venv stays free of torch: PyPI's torch for CPython 3.10
# is a CUDA build of several GB, its CPU build for 3.11+ a ~190 MB wheel (torch-requirements.txt).
_torch_venv="$_repo/.venv-torch"

_torch_python_ok() {  # a CPython 3.11+ with venv
    "$1" -c 'import sys, venv; sys.exit(not sys.version_info[:2] >= (3, 11))' >/dev/null 2>&1
}

_find_torch_python() {
    local candidates=()
    [ -n "${TORCH_BASE_PYTHON:-}" ] && candidates+=("$TORCH_BASE_PYTHON")
    candidates+=(python3.11 python3.12 python3.13)
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=($(ls -d "$(pyenv root)"/versions/3.1[1-3].*/bin/python 2>/dev/null | sort -V))
    fi
    candidates+=(python3)
    local c
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 && _torch_python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

_make_torch_venv() {
    local python want
    if ! python="$(_find_torch_python)"; then
        echo "setup.sh: no CPython 3.11+ found for .venv-torch (torch's CPU wheels start there)." >&2
        echo "setup.sh: install one (e.g. 'pyenv install 3.11'), or point TORCH_BASE_PYTHON at it" >&2
        return 1
    fi
    if [ -x "$_torch_venv/bin/python" ] && ! _torch_python_ok "$_torch_venv/bin/python"; then
        echo "setup.sh: $_torch_venv is broken or of another Python; recreating it" >&2
        rm -rf "$_torch_venv"
    fi
    if [ ! -x "$_torch_venv/bin/python" ]; then
        echo "setup.sh: creating $_torch_venv with $python ($("$python" -V 2>&1))" >&2
        "$python" -m venv "$_torch_venv" || return 1
    fi
    want="$(sha256sum "$_repo/torch-requirements.txt" | cut -d' ' -f1)"
    if [ "$(cat "$_torch_venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
        echo "setup.sh: installing torch-requirements.txt into $_torch_venv (CPU torch: about 1.5 GB, once)" >&2
        "$_torch_venv/bin/python" -m pip install -q --disable-pip-version-check -r "$_repo/torch-requirements.txt" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || return 1
        echo "$want" > "$_torch_venv/.requirements.sha256"
    fi
    echo "setup.sh: $_torch_venv is ready; export_onnx.py --bioimageio uses it for the PyTorch weights" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = "--torch" ]; then
    _make_torch_venv
    exit $?
fi
unset -f _torch_python_ok _find_torch_python _make_torch_venv
unset _torch_venv

if _make_venv; then
    # activate reads unset variables, which `set -u` (in our scripts) would reject
    case $- in *u*) _had_nounset=1; set +u ;; *) _had_nounset= ;; esac
    # shellcheck disable=SC1091
    source "$_venv/bin/activate"
    [ -n "$_had_nounset" ] && set -u
    unset _had_nounset
    unset -f _python_ok _find_python _requirements_hash _make_venv
else
    unset -f _python_ok _find_python _requirements_hash _make_venv
    return 1 2>/dev/null || exit 1
fi
