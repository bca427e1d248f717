#!/usr/bin/env bash
# Pack everything the GPU machine needs to check, tune and time sparsec's CUDA kernels in ONE run, then print the
# command to run there (the `device` tool's `run`, or any machine with an NVIDIA GPU, torch and Python 3.12).
#
#   bash bench/device_pack.sh            # here: builds .devpack/ (ignored by git) and .whl/
#   <run the printed command on the GPU machine, carrying .devpack and .whl; it writes to $OUT>
#   python bench/bench_cuda.py report --raw $OUT/cuda_device.json --tuning   # here: tables + tuning DB
#
# .devpack/ holds: sparsec_cuda.so + manifest.json (every kernel kind: defaults and the schedule-search candidates,
# SASS for sm_90a), tvm_rt/ (a runtime-only copy of the installed apache-tvm: no compiler library, no 3rdparty),
# e2e/ (the golden GPT compiled for h100 with each kernel kind), gt/ (the libraries of
# `pytest tests/test_cuda_kernels.py -m gpu`, bench/gpu_test_libs.py). .whl/ holds the apache-tvm-ffi wheel for cp312.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${PACK:-.devpack}
mkdir -p "$PACK" .whl .git/info
for d in /.devpack/ /.whl/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done

ver=$(python -c "import tvm_ffi; print(tvm_ffi.__version__)")
if ! ls .whl/apache_tvm_ffi-"$ver"-cp312-*.whl >/dev/null 2>&1; then
  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "apache-tvm-ffi==$ver"
fi

python bench/bench_cuda.py build --pack "$PACK" --arch sm_90a
rm -rf "$PACK/build"
python bench/gpu_test_libs.py --out "$PACK/gt" --arch sm_90a   # the GPU tests' libraries (the GPU machine may lack g++)

python - "$PACK/tvm_rt" <<'PY'
import os, shutil, sys, tvm
src, dst = os.path.dirname(tvm.__file__), os.path.join(sys.argv[1], "tvm")
shutil.rmtree(sys.argv[1], ignore_errors=True)
skip = shutil.ignore_patterns("3rdparty", "libtvm_compiler.so", "__pycache__", "src", "include")
shutil.copytree(src, dst, ignore=skip)
PY

rm -rf "$PACK/gpt24" "$PACK/e2e"
python -m sparsec compress --example tiny-gpt --nm 2:4 --target h100 -o "$PACK/gpt24" >/dev/null
python bench/cuda_e2e.py build --src "$PACK/gpt24" --out "$PACK/e2e"
rm -rf "$PACK/gpt24"
du -sh "$PACK" .whl

cat <<'CMD'
# --- on the GPU machine (repo root; carry .devpack and .whl), one run:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.devpack/tvm_rt TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1 || exit; python3 bench/bench_cuda.py device --pack .devpack --out $OUT 2>&1 | tee $OUT/log.txt | grep -v '^tuned'; SPARSEC_CUDA_TEST_LIBS=.devpack/gt python3 -m pytest tests/test_cuda_kernels.py -m gpu -q -p no:cacheprovider --junitxml=$OUT/pytest_gpu.xml 2>&1 | tail -4; python3 bench/cuda_e2e.py run --dir .devpack/e2e --out $OUT 2>&1 | tail -12
CMD
