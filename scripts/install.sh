#!/usr/bin/env bash
# Installs everything sparsec needs on a fresh Debian machine, then runs the main job on the embedded example.
#   ./scripts/install.sh              # system packages + Python packages + example run
#   ./scripts/install.sh --no-example # without the example run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# System packages: clang/lld (wasm and cross linking), qemu-user + aarch64 cross toolchain (ARM tests),
# chromium (browser test of the wasm build), wabt (wasm disassembly checks). Tests that need a missing tool skip
# with the reason.
APT_PKGS="clang lld qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross chromium wabt"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="$(command -v sudo || true)"; fi
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
      echo "installing system packages:$missing"
      $SUDO apt-get update -qq || true
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null \
        || echo "warning: some system packages could not be installed ($missing); tests needing them will skip" >&2
    else
      echo "warning: not root and no sudo: system packages not installed ($missing); tests needing them will skip" >&2
    fi
  fi
fi

# Python packages. torch is pinned to the CPU wheel (2.13.0) before anything else can pull a CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# cuobjdump + nvdisasm (SASS checks of the CUDA kernels in tests/test_cuda_kernels.py; x86_64 Linux wheels only)
if [ "$(uname -m)" = "x86_64" ]; then
  $PY -m pip install -q "nvidia-cuda-cuobjdump==13.5.37" "nvidia-cuda-nvdisasm==13.5.37" \
    || echo "warning: cuobjdump/nvdisasm wheels not installed: the SASS checks of the CUDA kernels will skip" >&2
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true

# JS packages of the wasm benchmark (bench/bench_arm_wasm.py): onnxruntime-web, pinned by bench/web/package-lock.json.
# Needs node/npm and the npm registry; without them the benchmark leaves out its onnxruntime-web baseline.
if command -v npm >/dev/null 2>&1; then
  (cd bench/web && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || echo "warning: npm ci in bench/web failed: the wasm benchmark runs without its onnxruntime-web baseline" >&2
else
  echo "warning: npm is not installed: the wasm benchmark runs without its onnxruntime-web baseline" >&2
fi

if [ "${1:-}" != "--no-example" ]; then
  mkdir -p out
  $PY -m sparsec compress --example tiny-gpt -o out/example-tiny-gpt --force
fi
