// Tensor-core issue ceilings of the sm_80-style instructions sparsec's kernels use, measured on the GPU at hand:
// independent mma.sp m16n8k32 (2:4 sparse) and mma m16n8k16 (dense) from registers, no memory traffic.
// Built by bench/bench_cuda.py build (nvcc -cubin), loaded with CuPy by the device step.
#include "sparsec_mma.cuh"

extern "C" __global__ void __launch_bounds__(256) peak_mma_sp(float* out, int iters) {
  uint32_t a[4], b[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a[i] = 0x3c003c00u ^ (threadIdx.x * (i + 1));
    b[i] = 0x3c003c00u ^ (threadIdx.x * (i + 7));
  }
  const uint32_t e = 0x44444444u;  // positions (0,1) in every chunk
  float c[8][4] = {};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < 8; ++j) sparsec::mma_sp_16832<0>(c[j], a, b, e);
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

extern "C" __global__ void __launch_bounds__(256) peak_mma(float* out, int iters) {
  uint32_t a[4], b0 = 0x3c003c00u ^ threadIdx.x, b1 = 0x3c003c00u ^ (3 * threadIdx.x);
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = 0x3c003c00u ^ (threadIdx.x * (i + 1));
  float c[8][4] = {};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < 8; ++j) sparsec::mma_16816(c[j], a, b0, b1);
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// the same with plain mma.sp (no ::ordered_metadata): which form issues faster on this GPU
extern "C" __global__ void __launch_bounds__(256) peak_mma_sp_plain(float* out, int iters) {
  uint32_t a[4], b[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a[i] = 0x3c003c00u ^ (threadIdx.x * (i + 1));
    b[i] = 0x3c003c00u ^ (threadIdx.x * (i + 7));
  }
  const uint32_t e = 0x44444444u;
  float c[8][4] = {};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      asm volatile(
          "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
          "{%0,%1,%2,%3}, %12, 0x0;\n"
          : "+f"(c[j][0]), "+f"(c[j][1]), "+f"(c[j][2]), "+f"(c[j][3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
