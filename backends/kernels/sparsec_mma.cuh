// sparsec CUDA kernels: 2:4 sparse tensor cores (mma.sp) and int4 dequant-in-register, sm_80 / sm_90.
//
// Every kernel computes  Y[M, N] = X[M, K] · Wᵀ  with W[N, K] the Linear weight (nn.Linear convention), fp16 in and
// out, fp32 accumulation. The weight is the *A* operand of the tensor-core instruction (its rows are the
// instruction's M dimension, so the 2:4 structure along K is the structure mma.sp wants) and the activations are the
// *B* operand (column-major B = row-major X). Y is written transposed back to [M, N].
//
// Weight layouts (built by sparsec.backends.kernels.cuda_sparse.prepare_*; "rt" = 16-row tile, "t" = 32-wide k step,
// lane = 32 threads of a warp, g = lane / 4, q = lane % 4):
//   KIND_SP16  values  [Np/16][T][32] x uint4      : the 8 fp16 of lane's A fragment of mma.sp.m16n8k32 (compressed
//                                                    16x16 tile: a0,a1=(g,2q..2q+1) a2,a3=(g+8,..) a4..a7 = +8 cols)
//   KIND_SP4   codes   [Np/16][T/4][32] x uint4    : word s of the uint4 = the 8 int4 codes of step 4u+s, nibble
//                                                    order (e0,e2,e4,e6,e1,e3,e5,e7) so that one shift+mask gives a
//                                                    half2 pair
//   KIND_DQ4   codes   [Np/16][T/2][32] x uint4    : word w = the 8 int4 codes of the m16n8k16 A fragment of k16
//                                                    unit 4u+w (dense int4, no sparsity)
//   KIND_DQ8   codes   [Np/16][T][32] x uint4      : words 2h, 2h+1 = the 8 byte codes (up to int8) of the m16n8k16
//                                                    A fragment of k16 unit 2t+h, element e in byte e (dense)
//   KIND_SP8   codes   [Np/16][T/2][32] x uint4    : words 2s, 2s+1 = the 8 byte codes (up to int8) of the
//                                                    compressed 16x16 tile of step 2u+s (KIND_SP16's fragment
//                                                    elements, element e in byte e % 4 of word 2s + e / 4)
//   meta (sparse)      [Np/16][T/2][32] x uint32   : pair p of steps: lanes q<2 hold the metadata of step 2p
//                                                    (sparsity selector 0), lanes q>=2 that of step 2p+1 (selector 1);
//                                                    bits 0-15 row g, bits 16-31 row g+8, 4 bits per 4-chunk
//   scales / zeros     [Np/16][G][8] x half2       : (row g, row g+8) of each 16-row tile and quantization group;
//                                                    zeros are stored as 1024+z (exact in fp16); without zeros
//                                                    the int4 kinds use z = 8, the int8 ones z = 128 (kSymZero)
#pragma once
#include <cuda.h>  // CUtensorMap: the warp-specialized GEMM's __grid_constant__ TMA descriptor
#include <cuda_fp16.h>
#include <stdint.h>

namespace sparsec {

enum { KIND_SP16 = 0, KIND_SP4 = 1, KIND_DQ4 = 2, KIND_DQ8 = 3, KIND_SP8 = 4 };

template <int KIND>
struct KindTraits;
template <>
struct KindTraits<KIND_SP16> {
  static constexpr bool kSparse = true, kQuant = false;
  static constexpr int kStepsPerChunk = 1;  // k32 steps per 16-byte lane chunk
  static constexpr int kColsPerStep = 16;   // value columns (compressed) per k32 step
  static constexpr uint32_t kSymZero = 0u;  // half2 (1024 + z, 1024 + z) of a weight without zero points
};
template <>
struct KindTraits<KIND_SP4> {
  static constexpr bool kSparse = true, kQuant = true;
  static constexpr int kStepsPerChunk = 4;
  static constexpr int kColsPerStep = 16;
  static constexpr uint32_t kSymZero = 0x64086408u;  // z = 8
};
template <>
struct KindTraits<KIND_DQ4> {
  static constexpr bool kSparse = false, kQuant = true;
  static constexpr int kStepsPerChunk = 2;
  static constexpr int kColsPerStep = 32;
  static constexpr uint32_t kSymZero = 0x64086408u;  // z = 8
};
template <>
struct KindTraits<KIND_DQ8> {
  static constexpr bool kSparse = false, kQuant = true;
  static constexpr int kStepsPerChunk = 1;
  static constexpr int kColsPerStep = 32;
  static constexpr uint32_t kSymZero = 0x64806480u;  // z = 128
};
template <>
struct KindTraits<KIND_SP8> {  // 2:4 + int8: KIND_SP4's structure with byte codes (two words a k32 step)
  static constexpr bool kSparse = true, kQuant = true;
  static constexpr int kStepsPerChunk = 2;
  static constexpr int kColsPerStep = 16;
  static constexpr uint32_t kSymZero = 0x64806480u;  // z = 128
};
// code words of one 16-column unit of a quantized kind: a k16 unit (dense) or a k32 step (2:4)
template <int KIND>
constexpr int kUnitWords = (KIND == KIND_DQ8 || KIND == KIND_SP8) ? 2 : 1;

// ------------------------------------------------------------------------------------------------ instructions
template <int SEL>
__device__ __forceinline__ void mma_sp_16832(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
#if defined(SPARSEC_PLAIN_MMA_SP)
#define SPARSEC_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
#else
#define SPARSEC_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
#endif
  if constexpr (SEL == 0) {
    asm volatile(SPARSEC_MMA_SP
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
  } else {
    asm volatile(SPARSEC_MMA_SP
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x1;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
  }
#undef SPARSEC_MMA_SP
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int n = pred ? 16 : 0;  // src-size 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t ldg_u32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ldg_u128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t h2_as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 u32_as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// 8 int4 codes (nibble order e0,e2,e4,e6,e1,e3,e5,e7) -> the 4 half2 registers of an A fragment, dequantized:
// w = (code - z) * s; registers 0 and 2 hold row g, registers 1 and 3 row g+8. sc/zb: half2 (row g, row g+8),
// zb = 1024 + z. (code | 0x6400) as fp16 is exactly 1024 + code, so the subtraction is exact.
__device__ __forceinline__ void dequant8(uint32_t q, uint32_t sc, uint32_t zb, uint32_t (&a)[4]) {
  half2 s2 = u32_as_h2(sc), z2 = u32_as_h2(zb);
  half2 s_lo = __low2half2(s2), s_hi = __high2half2(s2);
  half2 z_lo = __low2half2(z2), z_hi = __high2half2(z2);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t t = ((q >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
    half2 h = __hmul2(__hsub2(u32_as_h2(t), (i & 1) ? z_hi : z_lo), (i & 1) ? s_hi : s_lo);
    a[i] = h2_as_u32(h);
  }
}

// The same without the scale: registers hold code - z (integers in [-15, 15], exact in fp16). The decode GEMV of a
// weight whose quantization groups hold whole 64-column chunks (OG) multiplies by the scale once per chunk in fp32
// after the MMAs (4 FFMA per token tile and row tile instead of 16 HMUL2 per chunk).
__device__ __forceinline__ void dequant8_unscaled(uint32_t q, uint32_t zb, uint32_t (&a)[4]) {
  half2 z2 = u32_as_h2(zb);
  half2 z_lo = __low2half2(z2), z_hi = __high2half2(z2);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t t = ((q >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
    a[i] = h2_as_u32(__hsub2(u32_as_h2(t), (i & 1) ? z_hi : z_lo));
  }
}

// 8 byte codes (element e in byte e % 4 of word e / 4) -> the 4 half2 registers of an A fragment (register i = elements
// 2i, 2i+1: registers 0 and 2 row g, 1 and 3 row g+8), dequantized as dequant8 does: (code | 0x6400) as fp16 is
// exactly 1024 + code for a code < 256, so code - z is exact and (code - z) * s rounds once.
__device__ __forceinline__ uint32_t byte_pair_h2(uint32_t q, int hi) {
  return __byte_perm(q, 0x64646464u, hi ? 0x4342u : 0x4140u);  // bytes (2hi, 0x64, 2hi+1, 0x64)
}
__device__ __forceinline__ void dequant8_b(uint32_t q0, uint32_t q1, uint32_t sc, uint32_t zb, uint32_t (&a)[4]) {
  half2 s2 = u32_as_h2(sc), z2 = u32_as_h2(zb);
  half2 s_lo = __low2half2(s2), s_hi = __high2half2(s2);
  half2 z_lo = __low2half2(z2), z_hi = __high2half2(z2);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t t = byte_pair_h2(i < 2 ? q0 : q1, i & 1);
    a[i] = h2_as_u32(__hmul2(__hsub2(u32_as_h2(t), (i & 1) ? z_hi : z_lo), (i & 1) ? s_hi : s_lo));
  }
}
__device__ __forceinline__ void dequant8_b_unscaled(uint32_t q0, uint32_t q1, uint32_t zb, uint32_t (&a)[4]) {
  half2 z2 = u32_as_h2(zb);
  half2 z_lo = __low2half2(z2), z_hi = __high2half2(z2);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    a[i] = h2_as_u32(__hsub2(u32_as_h2(byte_pair_h2(i < 2 ? q0 : q1, i & 1)), (i & 1) ? z_hi : z_lo));
}

// unit v (a k16 unit of a dense kind, a k32 step of a 2:4 one) of a quantized kind's codes `w` -> the 4 half2
// registers of its A fragment: one word a unit for int4 (KIND_DQ4, KIND_SP4), two for int8 (KIND_DQ8, KIND_SP8).
// SCALED false: code - z only (sc unused).
template <int KIND, bool SCALED = true>
__device__ __forceinline__ void dequant_unit(const uint32_t* w, int v, uint32_t sc, uint32_t zb, uint32_t (&a)[4]) {
  if constexpr (kUnitWords<KIND> == 2) {
    if constexpr (SCALED) dequant8_b(w[2 * v], w[2 * v + 1], sc, zb, a);
    else dequant8_b_unscaled(w[2 * v], w[2 * v + 1], zb, a);
  } else {
    if constexpr (SCALED) dequant8(w[v], sc, zb, a);
    else dequant8_unscaled(w[v], zb, a);
  }
}

// B fragment (k32 x n8) of one n8 token tile straight from global memory: registers j = 0..3 hold
// X[tok][k0 + 8j + 2q .. +1] with tok = row (the caller clamps it to a valid row).
__device__ __forceinline__ void load_b_global(uint32_t (&b)[4], const half* __restrict__ xrow, int k0, int q) {
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = ldg_u32(xrow + k0 + 8 * j + 2 * q);
}

// ------------------------------------------------------------------------------------------------ GEMV (M <= 16)
// One block owns RT 16-row tiles of W and one of gridDim.y contiguous ranges of K (split-K: "ks" blocks per row
// tile); its WARPS warps split that range into contiguous ranges of 16-byte chunks and reduce through shared memory.
// W is streamed straight from global memory into registers (16-byte loads, each warp reading 512 contiguous bytes per
// row tile and chunk); X (tiny) is read through L1. Software pipelined: the loads of the next U chunks (weights,
// metadata, scales, activations) are issued before the current U chunks are computed (two register buffers).
// NT = n8 token tiles (1: M<=8, 2: M<=16). Options (template parameters): XS stages the activations in shared memory
// and reads them with ldmatrix (gemv_stage_x / gemv_xfrag); ST > 0 replaces the register buffers by a cp.async ring
// (GemvRing); PF prefetches weights into L2; OG scales int4 products after the MMAs.
//
// Split-K (gridDim.y = ks > 1): every block writes its fp32 partial tile to the workspace Ws, then counts itself in
// Cnt[blockIdx.x] (atomicAdd after __threadfence); the last of the ks blocks of a row tile sums the ks partials in
// split order 0..ks-1 (a fixed order: the result is deterministic, independent of which block finishes last), writes
// Y and resets the counter to 0 for the next launch. Ws: [gridDim.x][ks][RT*NT*4*32] floats; Cnt: gridDim.x words,
// zero before the first launch (the launcher allocates and clears them once per device and stream).

// [b, e) = part i of n items split into `parts` contiguous, balanced ranges (sizes differ by at most one).
// The kernel splits K chunks with it twice: among the ks blocks of a row tile, then among the block's warps.
__host__ __device__ __forceinline__ void split_range(int n, int parts, int i, int& b, int& e) {
  b = static_cast<int>((static_cast<long long>(n) * i) / parts);
  e = static_cast<int>((static_cast<long long>(n) * (i + 1)) / parts);
}

// One lane's addresses for chunk c of row tile rt (shared by the register loads, the L2 prefetch and the ring): its 16
// weight bytes, metadata word p of the chunk, and the scale / zero word of lookup i (sp4: k32 step c*CH+i, 16 value
// columns each; dq4: k16 unit 2*c*CH+i).
template <int KIND>
struct GemvAddr {
  static constexpr int CH = KindTraits<KIND>::kStepsPerChunk;
  static __device__ __forceinline__ const uint4* w(const uint4* Wv, int rt, int NC, int c, int lane) {
    return Wv + ((size_t)rt * NC + c) * 32 + lane;
  }
  static __device__ __forceinline__ const uint32_t* meta(const uint32_t* Wm, int rt, int T, int c, int p, int lane) {
    const int pair = CH == 1 ? (c >> 1) : c * (CH / 2) + p;
    return Wm + ((size_t)rt * (T / 2) + pair) * 32 + lane;
  }
  static __device__ __forceinline__ size_t scale(int rt, int G, int c, int i, int GS, int g) {
    const int col = KindTraits<KIND>::kSparse ? (c * CH + i) * 16 : (2 * c * CH + i) * 16;
    return ((size_t)rt * G + col / GS) * 8 + g;
  }
};

template <int KIND, int NT, int RT, int U>
struct GemvBuf {
  using Tr = KindTraits<KIND>;
  static constexpr int CH = Tr::kStepsPerChunk;
  static constexpr int MP = Tr::kSparse ? (CH + 1) / 2 : 1;          // metadata words per chunk
  static constexpr int NS = Tr::kQuant ? (Tr::kSparse ? CH : 2 * CH) : 1;  // scale lookups per chunk (dense: per k16)
  uint4 a[U][RT];
  uint32_t m[U][RT][MP];
  uint32_t s[U][RT][NS];
  uint32_t z[U][RT][NS];
  uint32_t b[U][CH][NT][4];
};

template <int KIND, int NT, int RT, int U, bool ASYM, bool OG, bool XS = false>
__device__ __forceinline__ void gemv_load(GemvBuf<KIND, NT, RT, U>& f, int c0, int c_end, int TK, const half* const (&xrow)[NT],
                                          const uint4* __restrict__ Wv, const uint32_t* __restrict__ Wm,
                                          const uint32_t* __restrict__ Sc, const uint32_t* __restrict__ Zb,
                                          const int (&rts)[RT], int NC, int T, int G, int GS, int lane) {
  using B = GemvBuf<KIND, NT, RT, U>;
  constexpr int CH = B::CH;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u;
    const bool ok = c < c_end;
    const int cc = ok ? c : 0;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int rt = rts[r];
      f.a[u][r] = ok ? ldg_u128(GemvAddr<KIND>::w(Wv, rt, NC, cc, lane)) : make_uint4(0, 0, 0, 0);
      if constexpr (KindTraits<KIND>::kSparse) {
#pragma unroll
        for (int p = 0; p < B::MP; ++p) f.m[u][r][p] = ldg_u32(GemvAddr<KIND>::meta(Wm, rt, T, cc, p, lane));
      }
      if constexpr (KindTraits<KIND>::kQuant) {
        // a chunk spans CH x kColsPerStep value columns (64; 32 for KIND_DQ8): with GS a multiple it lies in one
        // group (one load, replicated)
        const bool one_group = OG || GS % (CH * KindTraits<KIND>::kColsPerStep) == 0;
#pragma unroll
        for (int i = 0; i < B::NS; ++i) {
          if (one_group && i > 0) {
            f.s[u][r][i] = f.s[u][r][0];
            f.z[u][r][i] = f.z[u][r][0];
            continue;
          }
          const size_t si = GemvAddr<KIND>::scale(rt, G, cc, i, GS, g);
          f.s[u][r][i] = ldg_u32(Sc + si);
          f.z[u][r][i] = ASYM ? ldg_u32(Zb + si) : KindTraits<KIND>::kSymZero;
        }
      }
    }
    if constexpr (!XS) {  // XS: the activations are staged in shared memory instead (gemv_stage_x)
#pragma unroll
      for (int s = 0; s < CH; ++s) {
        const int t = cc * CH + s;
        const bool tok = ok && t < TK;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int j = 0; j < 4; ++j) f.b[u][s][n][j] = tok ? ldg_u32(xrow[n] + t * 32 + 8 * j + 2 * q) : 0u;
      }
    }
  }
}

// L2 prefetch of the U chunks from c (weights and, for 2:4 kinds, their metadata) of every row tile: one
// prefetch.global.L2 per 512-byte chunk (each lane names its own 16 bytes), no registers held. Meant to raise the bytes
// in flight beyond what the register buffers allow; measured slower at every distance on the H100
// (bench/results/cuda_kernels_decode_prefetch.md), so PF is 0 by default and outside the search space.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

template <int KIND, int RT, int U>
__device__ __forceinline__ void gemv_prefetch(int c0, int c_end, const uint4* __restrict__ Wv,
                                              const uint32_t* __restrict__ Wm, const int (&rts)[RT], int NC, int T,
                                              int lane) {
  constexpr int CH = KindTraits<KIND>::kStepsPerChunk;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u;
    if (c >= c_end) break;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      prefetch_l2(GemvAddr<KIND>::w(Wv, rts[r], NC, c, lane));
      if constexpr (KindTraits<KIND>::kSparse) {
        // metadata: one 128-byte pair line per two k32 steps (CH == 1: every other chunk starts a pair)
        if (CH > 1 || (c & 1) == 0) prefetch_l2(GemvAddr<KIND>::meta(Wm, rts[r], T, c, 0, lane));
        if constexpr (CH == 4) prefetch_l2(GemvAddr<KIND>::meta(Wm, rts[r], T, c, 1, lane));
      }
    }
  }
}

template <int KIND, int NT, int RT, int U, bool OG>
__device__ __forceinline__ void gemv_compute(const GemvBuf<KIND, NT, RT, U>& f, float (&acc)[RT][NT][4], int c0,
                                             int c_end) {
  using B = GemvBuf<KIND, NT, RT, U>;
  constexpr int CH = B::CH;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (c0 + u >= c_end) break;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const uint32_t* w4 = reinterpret_cast<const uint32_t*>(&f.a[u][r]);
      if constexpr (KIND == KIND_SP16) {
        const uint32_t a[4] = {w4[0], w4[1], w4[2], w4[3]};
        const int t = c0 + u;  // CH == 1: chunk == step
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if (t & 1) mma_sp_16832<1>(acc[r][n], a, f.b[u][0][n], f.m[u][r][0]);
          else mma_sp_16832<0>(acc[r][n], a, f.b[u][0][n], f.m[u][r][0]);
        }
      } else if constexpr (OG) {  // int4 kinds, one quantization group per chunk: scale after the MMAs, in fp32
        float t[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) t[n][i] = 0.f;
#pragma unroll
        for (int s = 0; s < CH; ++s) {
          if constexpr (KindTraits<KIND>::kSparse) {  // 2:4 + int4 / int8: step s of the chunk
            uint32_t a[4];
            dequant_unit<KIND, false>(w4, s, 0u, f.z[u][r][0], a);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              if (s & 1) mma_sp_16832<1>(t[n], a, f.b[u][s][n], f.m[u][r][s >> 1]);
              else mma_sp_16832<0>(t[n], a, f.b[u][s][n], f.m[u][r][s >> 1]);
            }
          } else {  // dense: k16 units 2s, 2s + 1 of the chunk
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              uint32_t a[4];
              dequant_unit<KIND, false>(w4, 2 * s + h, 0u, f.z[u][r][0], a);
#pragma unroll
              for (int n = 0; n < NT; ++n) mma_16816(t[n], a, f.b[u][s][n][2 * h], f.b[u][s][n][2 * h + 1]);
            }
          }
        }
        const half2 s2 = u32_as_h2(f.s[u][r][0]);  // (row g, row g + 8): accumulators 0, 1 and 2, 3
        const float s_lo = __low2float(s2), s_hi = __high2float(s2);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[r][n][0] = fmaf(s_lo, t[n][0], acc[r][n][0]);
          acc[r][n][1] = fmaf(s_lo, t[n][1], acc[r][n][1]);
          acc[r][n][2] = fmaf(s_hi, t[n][2], acc[r][n][2]);
          acc[r][n][3] = fmaf(s_hi, t[n][3], acc[r][n][3]);
        }
      } else if constexpr (KindTraits<KIND>::kSparse) {  // 2:4 + int4 / int8
#pragma unroll
        for (int s = 0; s < CH; ++s) {
          uint32_t a[4];
          dequant_unit<KIND>(w4, s, f.s[u][r][s], f.z[u][r][s], a);
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            if (s & 1) mma_sp_16832<1>(acc[r][n], a, f.b[u][s][n], f.m[u][r][s >> 1]);
            else mma_sp_16832<0>(acc[r][n], a, f.b[u][s][n], f.m[u][r][s >> 1]);
          }
        }
      } else {  // dense: k16 units 2s, 2s + 1 of the chunk
#pragma unroll
        for (int s = 0; s < CH; ++s)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t a[4];
            dequant_unit<KIND>(w4, 2 * s + h, f.s[u][r][2 * s + h], f.z[u][r][2 * s + h], a);
#pragma unroll
            for (int n = 0; n < NT; ++n) mma_16816(acc[r][n], a, f.b[u][s][n][2 * h], f.b[u][s][n][2 * h + 1]);
          }
      }
    }
  }
}

// ---- cp.async ring (ST > 0): the weights, metadata, scales and zero points of the next ST chunks are copied into a
// warp-private shared-memory ring by cp.async (no registers held for them: bytes in flight per warp = ST x RT x 512
// of weights, independent of the register budget); the activations of a chunk are read from global (L1) when it is
// computed. Every lane copies and later reads only its own words, so cp.async.wait_group is the only synchronisation.
__device__ __forceinline__ void cp_async16_ring(uint32_t s, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async4_ring(uint32_t s, const void* gmem, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 4 : 0) : "memory");
}

template <int KIND, int RT, bool ASYM, bool OG>
struct GemvRing {
  using Tr = KindTraits<KIND>;
  static constexpr int CH = Tr::kStepsPerChunk;
  static constexpr int MP = Tr::kSparse ? (CH + 1) / 2 : 0;                        // metadata words per chunk
  static constexpr int NS = Tr::kQuant ? (OG ? 1 : (Tr::kSparse ? CH : 2 * CH)) : 0;  // scale words per chunk
  static constexpr int NZ = ASYM ? NS : 0;
  static constexpr int kWords = 4 * RT + RT * (MP + NS + NZ);  // 32-bit words a lane holds per stage
  static constexpr int kStageBytes = kWords * 128;               // per warp: [slot][32 lanes] words
  // word offsets (x 32 lanes) of the slots inside a stage
  static constexpr int kM = 4 * RT, kS = kM + RT * MP, kZ = kS + RT * NS;
};

template <int KIND, int RT, bool ASYM, bool OG>
__device__ __forceinline__ void gemv_ring_issue(uint32_t stage, int c, int c_end, const uint4* __restrict__ Wv,
                                                const uint32_t* __restrict__ Wm, const uint32_t* __restrict__ Sc,
                                                const uint32_t* __restrict__ Zb, const int (&rts)[RT], int NC, int T,
                                                int G, int GS, int lane) {
  using R = GemvRing<KIND, RT, ASYM, OG>;
  const bool ok = c < c_end;
  const int cc = ok ? c : 0;
  const int g = lane >> 2;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int rt = rts[r];
    cp_async16_ring(stage + (r * 32 + lane) * 16, GemvAddr<KIND>::w(Wv, rt, NC, cc, lane), ok);
#pragma unroll
    for (int p = 0; p < R::MP; ++p)
      cp_async4_ring(stage + ((R::kM + r * R::MP + p) * 32 + lane) * 4, GemvAddr<KIND>::meta(Wm, rt, T, cc, p, lane), ok);
#pragma unroll
    for (int i = 0; i < R::NS; ++i) {
      const size_t si = GemvAddr<KIND>::scale(rt, G, cc, i, GS, g);
      cp_async4_ring(stage + ((R::kS + r * R::NS + i) * 32 + lane) * 4, Sc + si, ok);
      if constexpr (ASYM) cp_async4_ring(stage + ((R::kZ + r * R::NS + i) * 32 + lane) * 4, Zb + si, ok);
    }
  }
  cp_async_commit();
}

// the ring stage of chunk c + its activations -> the register buffer gemv_compute takes
template <int KIND, int NT, int RT, bool ASYM, bool OG>
__device__ __forceinline__ void gemv_ring_read(GemvBuf<KIND, NT, RT, 1>& f, const unsigned char* stage, int c, int TK,
                                               const half* const (&xrow)[NT], int lane) {
  using R = GemvRing<KIND, RT, ASYM, OG>;
  using B = GemvBuf<KIND, NT, RT, 1>;
  const int q = lane & 3;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(stage);
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    f.a[0][r] = reinterpret_cast<const uint4*>(stage)[r * 32 + lane];
#pragma unroll
    for (int p = 0; p < R::MP; ++p) f.m[0][r][p] = w[(R::kM + r * R::MP + p) * 32 + lane];
    if constexpr (KindTraits<KIND>::kQuant) {
#pragma unroll
      for (int i = 0; i < B::NS; ++i) {
        const int j = R::NS == 1 ? 0 : i;
        f.s[0][r][i] = w[(R::kS + r * R::NS + j) * 32 + lane];
        f.z[0][r][i] = ASYM ? w[(R::kZ + r * R::NS + j) * 32 + lane] : KindTraits<KIND>::kSymZero;
      }
    }
  }
#pragma unroll
  for (int s = 0; s < R::CH; ++s) {
    const int t = c * R::CH + s;
    const bool tok = t < TK;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) f.b[0][s][n][j] = tok ? ldg_u32(xrow[n] + t * 32 + 8 * j + 2 * q) : 0u;
  }
}

// ---- XS: the activations of a warp's next U chunks are staged into a warp-private shared buffer by cp.async (rows
// < M only, 16 bytes a copy) and read as B fragments with ldmatrix.x4: one instruction per k32 step and token tile
// instead of four 32-bit loads. Rows are padded by 16 bytes so the 8 rows an ldmatrix phase reads hit distinct banks.
template <int KIND, int NT, int U>
struct XTile {
  static constexpr int CH = KindTraits<KIND>::kStepsPerChunk;
  static constexpr int kRowBytes = CH * 64 + 16;
  static constexpr int kChunkBytes = NT * 8 * kRowBytes;
  static constexpr int kBytes = U * kChunkBytes;  // one of the two buffers
  static constexpr int kPieces = CH * 4;          // 16-byte pieces a row
};

// WR > 1: the buffer is shared by the WR warps of a k-group (row group gr stages every WR-th 32 pieces).
template <int KIND, int NT, int U, int WR = 1>
__device__ __forceinline__ void gemv_stage_x(uint32_t buf, int c0, int c_end, int TK, const half* __restrict__ X, int M,
                                             int K, int lane, int gr = 0) {
  using XT = XTile<KIND, NT, U>;
  const int rows = min(M, NT * 8);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u;
    if (c >= c_end) break;
    for (int i = gr * 32 + lane; i < rows * XT::kPieces; i += 32 * WR) {
      const int r = i / XT::kPieces, p = i % XT::kPieces;
      const int t = c * XT::CH + p / 4;  // k32 step of the piece
      const bool ok = t < TK;
      cp_async16_ring(buf + u * XT::kChunkBytes + r * XT::kRowBytes + p * 16, X + (size_t)r * K + (ok ? t * 32 + (p & 3) * 8 : 0), ok);
    }
  }
  cp_async_commit();
}

template <int KIND, int NT, int RT, int U>
__device__ __forceinline__ void gemv_xfrag(GemvBuf<KIND, NT, RT, U>& f, const unsigned char* buf, int c0, int c_end, int M,
                                           int lane) {
  using XT = XTile<KIND, NT, U>;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (c0 + u >= c_end) break;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int row = min(n * 8 + (lane & 7), M - 1);  // lanes 8j..8j+7: the rows of matrix j
      const unsigned char* base = buf + u * XT::kChunkBytes + row * XT::kRowBytes + (lane >> 3) * 16;
#pragma unroll
      for (int s = 0; s < XT::CH; ++s) ldmatrix_x4(f.b[u][s][n], base + s * 64);
    }
  }
}

// bar.sync on named barrier `id` (1..15; 0 is __syncthreads') for `threads` threads (a multiple of 32)
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The WR warps of k-group kw (named barrier 1 + kw); one warp: __syncwarp.
template <int WR>
__device__ __forceinline__ void gemv_group_sync(int kw) {
  if constexpr (WR == 1) __syncwarp();
  else named_bar_sync(1 + kw, WR * 32);
}

template <int KIND, int NT, int WARPS, int RT, int U, bool ASYM, int PF, bool OG, int ST, bool XS, int WR = 1>
__device__ __forceinline__ void gemv_body(const half* __restrict__ X, const uint4* __restrict__ Wv,
                                          const uint32_t* __restrict__ Wm, const uint32_t* __restrict__ Sc,
                                          const uint32_t* __restrict__ Zb, half* __restrict__ Y, float* __restrict__ Ws,
                                          unsigned* __restrict__ Cnt, int M, int N, int K, int T, int G, int GS) {
  using Tr = KindTraits<KIND>;
  constexpr int CH = Tr::kStepsPerChunk;
  // Programmatic dependent launch (PDL, sm_90; both instructions are no-ops where the launch did not ask for it):
  // this kernel may start while the stream's previous kernel finishes. It reads nothing an earlier kernel writes (X,
  // the split-K workspace) and writes nothing before griddepcontrol.wait below, which waits for the earlier kernel to
  // complete and its writes to be visible. The next kernel may launch once every block of this one has passed its
  // main loop (griddepcontrol.launch_dependents before the reduction): triggered at the start, its waiting blocks
  // took SM slots from this grid (int4 decode 7.4 -> 9.0 us). Fetching weights into L2 before the wait was slower.
  // WR row groups x WK k-groups of warps: warp (gr, kw) owns row tiles gr*RT .. +RT-1 of the block and the kw-th part
  // of the block's K range; the WR warps of a k-group share its staged activations (read from L2 once for WR*RT row
  // tiles), synchronised by a named barrier per k-group
  constexpr int WK = WARPS / WR;
  static_assert(WARPS % WR == 0 && (WR == 1 || (XS && ST == 0 && WK <= 15)), "row groups need XS, <= 15 k-groups");
  extern __shared__ float red[];  // [WARPS][RT*NT*4][32]
  __shared__ int last_block;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = warp / WK, kw = warp % WK;
  const int g = lane >> 2;
  const int n_rt = (N + 15) >> 4;
  const int TK = K >> 5;               // real k32 steps (K % 32 == 0)
  const int NC = T / CH;               // 16-byte chunks per row tile (padded)
  const int NCK = (TK + CH - 1) / CH;  // chunks holding real steps
  const int rt0 = blockIdx.x * (WR * RT);
  int rts[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) rts[r] = min(rt0 + gr * RT + r, n_rt - 1);

  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][n][i] = 0.f;

  const half* xrow[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) xrow[n] = X + (size_t)min(n * 8 + g, M - 1) * K;

  // chunk range of this block's K split, then of this warp inside it
  const int ks = gridDim.y;
  int s_begin, s_end, c_begin, c_end;
  split_range(NCK, ks, blockIdx.y, s_begin, s_end);
  split_range(s_end - s_begin, WK, kw, c_begin, c_end);
  c_begin += s_begin;
  c_end += s_begin;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  if constexpr (ST > 0) {
    using R = GemvRing<KIND, RT, ASYM, OG>;
    // ring after the reduction buffer: [WARPS][ST] stages of R::kStageBytes
    unsigned char* ring = reinterpret_cast<unsigned char*>(red + WARPS * RT * NT * 4 * 32) + (size_t)warp * ST * R::kStageBytes;
    const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
#pragma unroll
    for (int d = 0; d < ST; ++d)
      gemv_ring_issue<KIND, RT, ASYM, OG>(ring_s + d * R::kStageBytes, c_begin + d, c_end, Wv, Wm, Sc, Zb, rts, NC, T, G, GS, lane);
    for (int c0 = c_begin; c0 < c_end; c0 += ST) {
#pragma unroll
      for (int d = 0; d < ST; ++d) {
        const int c = c0 + d;
        if (c >= c_end) break;
        cp_async_wait<ST - 1>();
        GemvBuf<KIND, NT, RT, 1> f;
        gemv_ring_read<KIND, NT, RT, ASYM, OG>(f, ring + d * R::kStageBytes, c, TK, xrow, lane);
        gemv_compute<KIND, NT, RT, 1, OG>(f, acc, c, c_end);
        gemv_ring_issue<KIND, RT, ASYM, OG>(ring_s + d * R::kStageBytes, c + ST, c_end, Wv, Wm, Sc, Zb, rts, NC, T, G, GS, lane);
      }
    }
    cp_async_wait<0>();
  } else {
  GemvBuf<KIND, NT, RT, U> fa, fb;
  using XT = XTile<KIND, NT, U>;
  // XS: two activation buffers per k-group after the reduction buffer, [WK][2][XT::kBytes]
  unsigned char* xb = reinterpret_cast<unsigned char*>(red + WARPS * RT * NT * 4 * 32) + (size_t)kw * 2 * XT::kBytes;
  const uint32_t xs0 = XS ? static_cast<uint32_t>(__cvta_generic_to_shared(xb)) : 0u, xs1 = xs0 + XT::kBytes;
  // PF > 0: chunks [c + U, c + U + PF) are prefetched into L2 while chunks [c, c + U) load into registers; the
  // prefetch window then slides U chunks with every register load
  if constexpr (PF > 0) {
#pragma unroll
    for (int d = 0; d < PF; d += U) gemv_prefetch<KIND, RT, U>(c_begin + U + d, c_end, Wv, Wm, rts, NC, T, lane);
  }
  if (c_begin < c_end) {
    gemv_load<KIND, NT, RT, U, ASYM, OG, XS>(fa, c_begin, c_end, TK, xrow, Wv, Wm, Sc, Zb, rts, NC, T, G, GS, lane);
    if constexpr (XS) gemv_stage_x<KIND, NT, U, WR>(xs0, c_begin, c_end, TK, X, M, K, lane, gr);
  }
  for (int c = c_begin; c < c_end; c += 2 * U) {
    if constexpr (PF > 0) gemv_prefetch<KIND, RT, U>(c + U + PF, c_end, Wv, Wm, rts, NC, T, lane);
    if (c + U < c_end) gemv_load<KIND, NT, RT, U, ASYM, OG, XS>(fb, c + U, c_end, TK, xrow, Wv, Wm, Sc, Zb, rts, NC, T, G, GS, lane);
    if constexpr (XS) {  // one commit group per buffer fill (empty past the end), so wait_group 1 = the older one
      gemv_stage_x<KIND, NT, U, WR>(xs1, c + U, c_end, TK, X, M, K, lane, gr);
      cp_async_wait<1>();
      gemv_group_sync<WR>(kw);
      gemv_xfrag<KIND, NT, RT, U>(fa, xb, c, c_end, M, lane);
    }
    gemv_compute<KIND, NT, RT, U, OG>(fa, acc, c, c_end);
    if (c + U >= c_end) break;
    if constexpr (XS) gemv_group_sync<WR>(kw);  // every lane's ldmatrix of buffer 0 is done before it is refilled
    if constexpr (PF > 0) gemv_prefetch<KIND, RT, U>(c + 2 * U + PF, c_end, Wv, Wm, rts, NC, T, lane);
    if (c + 2 * U < c_end) gemv_load<KIND, NT, RT, U, ASYM, OG, XS>(fa, c + 2 * U, c_end, TK, xrow, Wv, Wm, Sc, Zb, rts, NC, T, G, GS, lane);
    if constexpr (XS) {
      gemv_stage_x<KIND, NT, U, WR>(xs0, c + 2 * U, c_end, TK, X, M, K, lane, gr);
      cp_async_wait<1>();
      gemv_group_sync<WR>(kw);
      gemv_xfrag<KIND, NT, RT, U>(fb, xb + XT::kBytes, c + U, c_end, M, lane);
    }
    gemv_compute<KIND, NT, RT, U, OG>(fb, acc, c + U, c_end);
    if constexpr (XS) gemv_group_sync<WR>(kw);
  }
  if constexpr (XS) cp_async_wait<0>();
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  // cross-warp reduction: the WK warps of each row group; value v of the block's tile = (row group, r, n, i)
  constexpr int NV = RT * NT * 4;       // per warp
  constexpr int NVB = WR * NV;          // per block
  auto wsum = [&](int idx) {  // idx = v * 32 + lane over the block's tile
    const int grp = idx / (NV * 32);
    const float* base = red + (size_t)grp * WK * NV * 32 + (idx - grp * NV * 32);
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) s += base[w * NV * 32];
    return s;
  };
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[((warp * NV) + (r * NT + n) * 4 + i) * 32 + lane] = acc[r][n][i];
  __syncthreads();
  auto store = [&](int idx, float s) {
    const int l = idx & 31, v = idx >> 5;
    const int i = v & 3, n = (v >> 2) % NT, r = (v >> 2) / NT;
    const int row = (rt0 + r) * 16 + (l >> 2) + ((i >> 1) << 3);
    const int tok = n * 8 + 2 * (l & 3) + (i & 1);
    if (rt0 + r < n_rt && row < N && tok < M) Y[(size_t)tok * N + row] = __float2half_rn(s);
  };
  if (ks == 1) {
    for (int idx = threadIdx.x; idx < NVB * 32; idx += WARPS * 32) store(idx, wsum(idx));
    return;
  }
  // split-K: partial tile -> workspace, the last block of the row tile reduces the ks partials in split order
  float* part = Ws + (size_t)blockIdx.x * ks * (NVB * 32);
  for (int idx = threadIdx.x; idx < NVB * 32; idx += WARPS * 32) __stcg(part + (size_t)blockIdx.y * (NVB * 32) + idx, wsum(idx));
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(Cnt + blockIdx.x, 1u) == (unsigned)(ks - 1);
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < NVB * 32; idx += WARPS * 32) {
    float s = 0.f;
    for (int k = 0; k < ks; ++k) s += __ldcg(part + (size_t)k * (NVB * 32) + idx);
    store(idx, s);
  }
  if (threadIdx.x == 0) Cnt[blockIdx.x] = 0u;  // ready for the next launch (stream order)
}

// ------------------------------------------------------------------------ int4 / int8 -> fp16 (prefill on sm_90a)
// The int4 / int8 kinds at large M on sm_90a ("dq16"): the prepared codes are dequantized once per call into fp16 A
// fragments in a scratch buffer, which the warp-specialized wgmma GEMM then reads:
//   - KIND_SP4 -> the prepared sp16 layout ([Np/16][T][32] x uint4: the fragment of each compressed 16x16 tile, one
//     per k32 step), read by the 2:4 kernel with the sp4 metadata unchanged (same layout for both kinds);
//   - KIND_DQ4, KIND_DQ8 -> dense m16n8k16 A fragments ([Np/16][K/16][32] x uint4, one per k16 unit), read by the
//     dense kernel.
// A "unit" is 16 of the values' own columns (a k32 step of sp4, a k16 unit of dq4 / dq8); U = units per row tile (T
// for sp4, 2T for dq4 / dq8). Per lane, one uint4 of codes holds UPT consecutive units: BITS = 4 (sp4, dq4): 4 units,
// word w = unit 4u + w (8 nibbles); BITS = 8 (dq8): 2 units, words 2h, 2h + 1 = unit 2u + h (8 bytes). Thread i: lane
// i % 32 of units UPT u .. UPT u + UPT - 1 of one row tile; reads one uint4, writes UPT, coalesced across the warp;
// the same dequantization as the decode GEMV ((code - z) * s in fp16). Sc / Zb: [Np/16][G][8] half2 (row g, row g+8)
// per group of GS columns: unit v is in group v * 16 / GS.
template <int BITS, bool ASYM>
__device__ __forceinline__ void codes_to_fp16_body(const uint4* __restrict__ Wq, const uint32_t* __restrict__ Sc,
                                                   const uint32_t* __restrict__ Zb, uint4* __restrict__ Wv, int n_rt,
                                                   int U, int G, int GS) {
  constexpr int UPT = BITS == 8 ? 2 : 4;
  constexpr uint32_t kZero = BITS == 8 ? KindTraits<KIND_DQ8>::kSymZero : KindTraits<KIND_DQ4>::kSymZero;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_rt = static_cast<int64_t>(U / UPT) * 32;
  if (i >= per_rt * n_rt) return;
  const int rt = static_cast<int>(i / per_rt), u = static_cast<int>((i % per_rt) >> 5), lane = static_cast<int>(i & 31);
  const int g = lane >> 2;
  const uint4 q = Wq[i];  // (rt * (U / UPT) + u) * 32 + lane
  const uint32_t qs[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int w = 0; w < UPT; ++w) {
    const int unit = UPT * u + w;
    const size_t si = ((size_t)rt * G + (unit * 16) / GS) * 8 + g;
    uint32_t a[4];
    dequant_unit<BITS == 8 ? KIND_DQ8 : KIND_DQ4>(qs, w, Sc[si], ASYM ? Zb[si] : kZero, a);
    Wv[((size_t)rt * U + unit) * 32 + lane] = make_uint4(a[0], a[1], a[2], a[3]);
  }
}

// ------------------------------------------------------------------------------------------------ GEMM (prefill)
// Block tile BM (weight rows) x BN (tokens) x BK, WM x WN warps, STAGES-deep cp.async pipeline. Shared memory per
// stage: the weight fragments of the tile (already in fragment order: plain 16-byte copies, conflict-free reads),
// the sparse metadata, the scale/zero slots of the quantization groups the tile touches, and X[BN][BK] with a
// 16-byte XOR swizzle for ldmatrix. Blocks are rasterized in groups of GROUP weight-row tiles so that a wave keeps
// a few weight tiles resident in L2 while the tokens stream.
template <int KIND, int BM, int BN, int BK, int WM, int WN, int STAGES, bool ASYM>
struct GemmCfg {
  using Tr = KindTraits<KIND>;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWTM = BM / WM, kWTN = BN / WN;  // warp tile
  static constexpr int kMT = kWTM / 16, kNT = kWTN / 8;
  static constexpr int kSteps = BK / 32;
  static constexpr int kBytesPerStep = 128 * (Tr::kSparse ? (KIND == KIND_SP16 ? 4 : kUnitWords<KIND>) : 2 * kUnitWords<KIND>);  // per 16-row tile
  static constexpr int kABytes = (BM / 16) * kSteps * kBytesPerStep;
  static constexpr int kMetaBytes = Tr::kSparse ? (BM / 16) * (kSteps / 2) * 128 : 0;
  static constexpr int kSlots = Tr::kQuant ? (Tr::kSparse ? kSteps : 2 * kSteps) : 0;  // groups a tile spans
  static constexpr int kScaleBytes = (BM / 16) * kSlots * 32 * (ASYM ? 2 : 1);
  static constexpr int kXBytes = BN * BK * 2;
  static constexpr int kStageBytes = kABytes + kMetaBytes + kScaleBytes + kXBytes;
  static constexpr int kCBytes = BN * (BM + 8) * 2;
  static constexpr int kSmem = (STAGES * kStageBytes > kCBytes) ? STAGES * kStageBytes : kCBytes;
  static_assert(BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "tile/warp mismatch");
  static_assert(BK % 64 == 0, "BK must be a multiple of 64");
  static_assert(KIND != KIND_SP4 || BK % 128 == 0, "int4 2:4 tiles need BK % 128 == 0");
  static_assert(kABytes % 16 == 0 && kMetaBytes % 16 == 0 && kXBytes % 16 == 0, "16-byte copies");
};

template <int KIND, int BM, int BN, int BK, int WM, int WN, int STAGES, bool ASYM>
__device__ __forceinline__ void gemm_body(const half* __restrict__ X, const uint4* __restrict__ Wv,
                                          const uint32_t* __restrict__ Wm, const uint32_t* __restrict__ Sc,
                                          const uint32_t* __restrict__ Zb, half* __restrict__ Y, int M, int N, int K,
                                          int T, int G, int GS, int GROUP) {
  using C = GemmCfg<KIND, BM, BN, BK, WM, WN, STAGES, ASYM>;
  using Tr = KindTraits<KIND>;
  constexpr int CH = Tr::kStepsPerChunk;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int n_rt = (N + 15) >> 4;  // 16-row tiles that exist in the weight arrays
  const int tiles_m = (n_rt * 16 + BM - 1) / BM, tiles_n = (M + BN - 1) / BN;

  // grouped rasterization
  const int pid = blockIdx.x;
  const int per_group = GROUP * tiles_n;
  const int grp_id = pid / per_group;
  const int first_m = grp_id * GROUP;
  const int gsize = min(tiles_m - first_m, GROUP);
  const int tm = first_m + (pid % per_group) % gsize;
  const int tn = (pid % per_group) / gsize;
  const int row_tile0 = tm * (BM / 16);  // first 16-row tile of the block
  const int tok0 = tn * BN;
  const int KT = (T * 32) / BK;  // k tiles over the padded K

  auto stage_ptr = [&](int s) { return smem + s * C::kStageBytes; };

  auto load_stage = [&](int s, int kt) {
    unsigned char* base = stage_ptr(s);
    // weights: per row tile, (BK/32)/CH chunks x 32 lanes x 16 B, contiguous in global memory
    {
      constexpr int chunks_per_rt = (C::kSteps / CH) * 32;
      constexpr int total = (BM / 16) * chunks_per_rt;
      const int c_first = kt * (C::kSteps / CH);
      for (int i = tid; i < total; i += C::kThreads) {
        const int r = i / chunks_per_rt, j = i % chunks_per_rt;
        const int rt = row_tile0 + r;
        const bool ok = rt < n_rt;
        const uint4* src = Wv + ((size_t)(ok ? rt : 0) * (T / CH) + c_first) * 32 + j;
        cp_async16(base + (size_t)i * 16, src, ok);
      }
    }
    if constexpr (Tr::kSparse) {
      constexpr int per_rt = (C::kSteps / 2) * 8;  // 16-byte pieces of metadata per row tile
      constexpr int total = (BM / 16) * per_rt;
      const int p_first = kt * (C::kSteps / 2);
      for (int i = tid; i < total; i += C::kThreads) {
        const int r = i / per_rt, j = i % per_rt;
        const int rt = row_tile0 + r;
        const bool ok = rt < n_rt;
        const unsigned char* src =
            reinterpret_cast<const unsigned char*>(Wm + ((size_t)(ok ? rt : 0) * (T / 2) + p_first) * 32) + j * 16;
        cp_async16(base + C::kABytes + (size_t)i * 16, src, ok);
      }
    }
    if constexpr (Tr::kQuant) {
      // slot s of row tile r <- group min(g0 + s, G - 1): 8 half2 = 32 bytes (x2 for zeros)
      const int g0 = Tr::kSparse ? (kt * (BK / 2)) / GS : (kt * BK) / GS;
      constexpr int pieces = (BM / 16) * C::kSlots * 2;
      unsigned char* sbase = base + C::kABytes + C::kMetaBytes;
      for (int i = tid; i < pieces * (ASYM ? 2 : 1); i += C::kThreads) {
        const int which = i / pieces, k = i % pieces;  // which: 0 scales, 1 zeros
        const int r = k / (C::kSlots * 2), sl = (k / 2) % C::kSlots, half_ = k & 1;
        const int rt = row_tile0 + r;
        const bool ok = rt < n_rt;
        const int grp = min(g0 + sl, G - 1);
        const uint32_t* arr = which ? Zb : Sc;
        const unsigned char* src = reinterpret_cast<const unsigned char*>(arr + ((size_t)(ok ? rt : 0) * G + grp) * 8) + half_ * 16;
        cp_async16(sbase + (size_t)i * 16, src, ok);
      }
    }
    {
      // X tile [BN][BK] halves, 16-byte chunk c of row r stored at chunk (c ^ (r & 7))
      constexpr int cpr = BK / 8;
      constexpr int total = BN * cpr;
      unsigned char* xb = base + C::kABytes + C::kMetaBytes + C::kScaleBytes;
      const int k_first = kt * BK;
      for (int i = tid; i < total; i += C::kThreads) {
        const int r = i / cpr, c = i % cpr;
        const int tok = tok0 + r, k = k_first + c * 8;
        const bool ok = tok < M && k < K;
        const half* src = X + (ok ? ((size_t)tok * K + k) : 0);
        cp_async16(xb + ((size_t)r * cpr + (c ^ (r & 7))) * 16, src, ok);
      }
    }
  };

  float acc[C::kMT][C::kNT][4];
#pragma unroll
  for (int a = 0; a < C::kMT; ++a)
#pragma unroll
    for (int b = 0; b < C::kNT; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_stage(nk % STAGES, nk);
      cp_async_commit();
    }
    const unsigned char* base = stage_ptr(kt % STAGES);
    const unsigned char* xb = base + C::kABytes + C::kMetaBytes + C::kScaleBytes;
    const uint32_t* sb = reinterpret_cast<const uint32_t*>(base + C::kABytes + C::kMetaBytes);
    const int g0 = Tr::kQuant ? (Tr::kSparse ? (kt * (BK / 2)) / GS : (kt * BK) / GS) : 0;
#pragma unroll
    for (int ks = 0; ks < C::kSteps; ++ks) {
      uint32_t b[C::kNT][4];
#pragma unroll
      for (int n = 0; n < C::kNT; ++n) {
        const int r = wn * C::kWTN + n * 8 + (lane & 7);
        const int c = ks * 4 + (lane >> 3);  // 16-byte chunk (8 halves) within the row
        ldmatrix_x4(b[n], xb + ((size_t)r * (BK / 8) + (c ^ (r & 7))) * 16);
      }
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt) {
        const int r = wm * C::kMT + mt;  // row tile within the block
        if constexpr (KIND == KIND_SP16) {
          const uint4 v = *reinterpret_cast<const uint4*>(base + ((size_t)(r * C::kSteps + ks) * 32 + lane) * 16);
          const uint32_t a[4] = {v.x, v.y, v.z, v.w};
          const uint32_t e =
              *reinterpret_cast<const uint32_t*>(base + C::kABytes + ((size_t)(r * (C::kSteps / 2) + ks / 2) * 32 + lane) * 4);
#pragma unroll
          for (int n = 0; n < C::kNT; ++n) {
            if (ks & 1) mma_sp_16832<1>(acc[mt][n], a, b[n], e);
            else mma_sp_16832<0>(acc[mt][n], a, b[n], e);
          }
        } else if constexpr (Tr::kSparse) {  // 2:4 + int4 / int8: the step's codes, 4 (int4) or 8 bytes a lane
          const unsigned char* wp = base + ((size_t)(r * (C::kSteps / CH) + ks / CH) * 32 + lane) * 16 + (ks % CH) * (16 / CH);
          uint32_t ws[2];
          if constexpr (kUnitWords<KIND> == 2) {
            const uint2 w2 = *reinterpret_cast<const uint2*>(wp);
            ws[0] = w2.x, ws[1] = w2.y;
          } else {
            ws[0] = *reinterpret_cast<const uint32_t*>(wp);
          }
          const int t = kt * C::kSteps + ks;
          const int sl = (t * 16) / GS - g0;
          const uint32_t sc = sb[(r * C::kSlots + sl) * 8 + g];
          const uint32_t zb = ASYM ? sb[(BM / 16) * C::kSlots * 8 + (r * C::kSlots + sl) * 8 + g] : Tr::kSymZero;
          uint32_t a[4];
          dequant_unit<KIND>(ws, 0, sc, zb, a);
          const uint32_t e =
              *reinterpret_cast<const uint32_t*>(base + C::kABytes + ((size_t)(r * (C::kSteps / 2) + ks / 2) * 32 + lane) * 4);
#pragma unroll
          for (int n = 0; n < C::kNT; ++n) {
            if (ks & 1) mma_sp_16832<1>(acc[mt][n], a, b[n], e);
            else mma_sp_16832<0>(acc[mt][n], a, b[n], e);
          }
        } else {  // dense: the k32 step's codes are 8 bytes a lane (int4: half of a 2-step chunk) or 16 (int8)
          const unsigned char* wp = base + ((size_t)(r * (C::kSteps / CH) + ks / CH) * 32 + lane) * 16 + (ks % CH) * (16 / CH);
          uint32_t ws[4];
          if constexpr (KIND == KIND_DQ8) {
            const uint4 w4 = *reinterpret_cast<const uint4*>(wp);
            ws[0] = w4.x, ws[1] = w4.y, ws[2] = w4.z, ws[3] = w4.w;
          } else {
            const uint2 w2 = *reinterpret_cast<const uint2*>(wp);
            ws[0] = w2.x, ws[1] = w2.y;
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int v = 2 * (kt * C::kSteps + ks) + h;
            const int sl = (v * 16) / GS - g0;
            const uint32_t sc = sb[(r * C::kSlots + sl) * 8 + g];
            const uint32_t zb = ASYM ? sb[(BM / 16) * C::kSlots * 8 + (r * C::kSlots + sl) * 8 + g] : Tr::kSymZero;
            uint32_t a[4];
            dequant_unit<KIND>(ws, h, sc, zb, a);
#pragma unroll
            for (int n = 0; n < C::kNT; ++n) mma_16816(acc[mt][n], a, b[n][2 * h], b[n][2 * h + 1]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // epilogue: registers -> smem C[BN][BM+8] (token-major) -> 16-byte stores of Y rows
  half* cs = reinterpret_cast<half*>(smem);
  constexpr int LDC = BM + 8;
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int n = 0; n < C::kNT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm * C::kWTM + mt * 16 + g + ((i >> 1) << 3);
        const int tk = wn * C::kWTN + n * 8 + 2 * q + (i & 1);
        cs[tk * LDC + m] = __float2half_rn(acc[mt][n][i]);
      }
  __syncthreads();
  const int row0 = tm * BM;
  if ((N & 7) == 0) {
    constexpr int cpr = BM / 8;
    for (int i = tid; i < BN * cpr; i += C::kThreads) {
      const int tk = i / cpr, c = i % cpr;
      const int tok = tok0 + tk, col = row0 + c * 8;
      if (tok < M && col < N)
        *reinterpret_cast<uint4*>(Y + (size_t)tok * N + col) = *reinterpret_cast<const uint4*>(cs + tk * LDC + c * 8);
    }
  } else {
    for (int i = tid; i < BN * BM; i += C::kThreads) {
      const int tk = i / BM, c = i % BM;
      const int tok = tok0 + tk, col = row0 + c;
      if (tok < M && col < N) Y[(size_t)tok * N + col] = cs[tk * LDC + c];
    }
  }
}

// ------------------------------------------------------------------------------------------------ Hopper GEMM (sp16)
// wgmma.mma_async.sp (sm_90a): the 2:4 weight is the sparse A operand, read from REGISTERS (the per-warp fragment of
// wgmma's register A is the mma.sp.m16n8k32 fragment, so the KIND_SP16 layout is used unchanged: one 16-byte
// shared-memory load per lane and k32 step), its metadata likewise (per-warp layout of mma.sp's ordered metadata,
// sparsity selector = k step parity). The activations are the dense B operand, read by the tensor core straight from
// shared memory through a matrix descriptor: X[BN tokens][64 k] tiles, K-major, 128-byte swizzle (16-byte chunk c of
// row r at chunk c ^ (r & 7), 8-row groups 1024 bytes apart) -- no ldmatrix, no register traffic for B.
// WGS warpgroups split the BM = 64*WGS weight rows; each issues m64nBNk32 for all BN tokens. Pipeline: STAGES
// cp.async stages, prefetch distance STAGES-2 (one wgmma group stays in flight while the next k tile is issued; the
// stage being overwritten was read by a group every warpgroup has waited for before the barrier).
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// K-major, 128-byte swizzle, 8-row groups 1024 bytes apart (SBO), LBO unused (1)
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_addr) {
  return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

template <int SEL>
__device__ __forceinline__ void wgmma_sp_m64n256k32_rs(float (&d)[32][4], const uint32_t (&a)[4], uint64_t desc_b, uint32_t e) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %134, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
      "}, "
      "{%128,%129,%130,%131}, %132, %133, %135, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]), "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]), "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]), "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]), "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]), "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]), "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]), "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]), "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "r"(1), "n"(SEL));
#else
  __trap();
#endif
}

template <int SEL>
__device__ __forceinline__ void wgmma_sp_m64n128k32_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b, uint32_t e) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
      "}, "
      "{%64,%65,%66,%67}, %68, %69, %71, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "r"(1), "n"(SEL));
#else
  __trap();
#endif
}


template <int BN>
struct WgmmaSp;
template <>
struct WgmmaSp<256> {
  template <int SEL>
  static __device__ __forceinline__ void run(float (&d)[32][4], const uint32_t (&a)[4], uint64_t desc, uint32_t e) {
    wgmma_sp_m64n256k32_rs<SEL>(d, a, desc, e);
  }
};
template <>
struct WgmmaSp<128> {
  template <int SEL>
  static __device__ __forceinline__ void run(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc, uint32_t e) {
    wgmma_sp_m64n128k32_rs<SEL>(d, a, desc, e);
  }
};

template <int BM, int BN, int BK, int STAGES>
struct WgCfg {
  static constexpr int kWGS = BM / 64;
  static constexpr int kThreads = kWGS * 128;
  static constexpr int kSteps = BK / 32;                     // k32 steps per stage
  static constexpr int kXBytes = BN * BK * 2;                // BK/64 swizzle atoms X[BN][64] fp16, one after another
  static constexpr int kABytes = (BM / 16) * kSteps * 512;   // fragments per 16-row tile and k32 step
  static constexpr int kMetaBytes = (BM / 16) * (kSteps / 2) * 128;  // metadata pairs per 16-row tile
  static constexpr int kStageBytes = (kXBytes + kABytes + kMetaBytes + 1023) / 1024 * 1024;
  static constexpr int kCBytes = BN * (BM + 8) * 2;
  static constexpr int kSmem = 1024 + ((STAGES * kStageBytes > kCBytes) ? STAGES * kStageBytes : kCBytes);
  static_assert(BM % 64 == 0 && (BN == 128 || BN == 256) && STAGES >= 3 && BK % 64 == 0, "wgmma tile");
};

// Dense wgmma (A = fp16 weight fragments from registers, the mma.m16n8k16 A layout per warp; B = activations from
// shared memory through the same 128-byte-swizzle K-major descriptor): the dense int4 kind's prefill on sm_90a
// dequantizes into this ("dq16" for dq4)
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[32][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, "
      "{%128,%129,%130,%131}, %132, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]), "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]), "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]), "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]), "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]), "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]), "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]), "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]), "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "{%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  __trap();
#endif
}

template <int BN>
struct WgmmaDense;
template <>
struct WgmmaDense<256> {
  static __device__ __forceinline__ void run(float (&d)[32][4], const uint32_t (&a)[4], uint64_t desc) {
    wgmma_m64n256k16_rs(d, a, desc);
  }
};
template <>
struct WgmmaDense<128> {
  static __device__ __forceinline__ void run(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
    wgmma_m64n128k16_rs(d, a, desc);
  }
};

template <int BM, int BN, int BK, int STAGES>
__device__ __forceinline__ void gemm_wgmma_body(const half* __restrict__ X, const uint4* __restrict__ Wv,
                                                const uint32_t* __restrict__ Wm, half* __restrict__ Y, int M, int N,
                                                int K, int T, int GROUP) {
  using C = WgCfg<BM, BN, BK, STAGES>;
  constexpr int S = C::kSteps;
  constexpr int P = STAGES - 2;  // prefetch distance
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem =
      smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n_rt = (N + 15) >> 4;
  const int tiles_m = (n_rt * 16 + BM - 1) / BM, tiles_n = (M + BN - 1) / BN;
  const int pid = blockIdx.x;
  const int per_group = GROUP * tiles_n;
  const int grp_id = pid / per_group;
  const int first_m = grp_id * GROUP;
  const int gsize = min(tiles_m - first_m, GROUP);
  const int tm = first_m + (pid % per_group) % gsize;
  const int tn = (pid % per_group) / gsize;
  const int row_tile0 = tm * (BM / 16);
  const int tok0 = tn * BN;
  const int KT = (T * 32) / BK;  // k tiles over the padded K

  auto load_stage = [&](int s, int kt) {
    unsigned char* base = smem + s * C::kStageBytes;
    {  // X tile [BN][BK]: per 64-wide atom h, 8 chunks per row, swizzled
      constexpr int cpr = BK / 8;
      const int k_first = kt * BK;
#pragma unroll 4
      for (int i = tid; i < BN * cpr; i += C::kThreads) {
        const int r = i / cpr, c = i % cpr;
        const int h = c >> 3, cc = c & 7;
        const int tok = tok0 + r, k = k_first + c * 8;
        const bool ok = tok < M && k < K;
        const half* src = X + (ok ? ((size_t)tok * K + k) : 0);
        cp_async16(base + (size_t)h * BN * 128 + ((size_t)r * 8 + (cc ^ (r & 7))) * 16, src, ok);
      }
    }
    {  // weight fragments: per row tile S steps x 32 lanes x 16 B, contiguous
      constexpr int total = (BM / 16) * S * 32;
      for (int i = tid; i < total; i += C::kThreads) {
        const int r = i / (S * 32), j = i % (S * 32);
        const int rt = row_tile0 + r;
        const bool ok = rt < n_rt;
        const uint4* src = Wv + ((size_t)(ok ? rt : 0) * T + kt * S) * 32 + j;
        cp_async16(base + C::kXBytes + (size_t)i * 16, src, ok);
      }
    }
    {  // metadata: per row tile S/2 x 128 B
      constexpr int per = (S / 2) * 8;
      constexpr int total = (BM / 16) * per;
      for (int i = tid; i < total; i += C::kThreads) {
        const int r = i / per, j = i % per;
        const int rt = row_tile0 + r;
        const bool ok = rt < n_rt;
        const unsigned char* src =
            reinterpret_cast<const unsigned char*>(Wm + ((size_t)(ok ? rt : 0) * (T / 2) + kt * (S / 2)) * 32) + j * 16;
        cp_async16(base + C::kXBytes + C::kABytes + (size_t)i * 16, src, ok);
      }
    }
  };

  float acc[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

#pragma unroll
  for (int s = 0; s < P; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  const int r_tile = warp;  // 16-row tile of this warp inside the block (warpgroup w/4 rows 64*(w/4)...)
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  static_assert(S == 2, "one 64-wide swizzle atom per stage (a BK = 128 generalisation measured slower)");
  auto compute = [&](int kt, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
    const int s = kt % STAGES;
    const unsigned char* base = smem + s * C::kStageBytes;
    const uint4 v0 = *reinterpret_cast<const uint4*>(base + C::kXBytes + ((size_t)(r_tile * 2 + 0) * 32 + lane) * 16);
    const uint4 v1 = *reinterpret_cast<const uint4*>(base + C::kXBytes + ((size_t)(r_tile * 2 + 1) * 32 + lane) * 16);
    const uint32_t e = *reinterpret_cast<const uint32_t*>(base + C::kXBytes + C::kABytes + ((size_t)r_tile * 32 + lane) * 4);
    a0[0] = v0.x; a0[1] = v0.y; a0[2] = v0.z; a0[3] = v0.w;
    a1[0] = v1.x; a1[1] = v1.y; a1[2] = v1.z; a1[3] = v1.w;
    const uint64_t desc = sw128_desc(smem_s + s * C::kStageBytes);
    wgmma_fence();
    WgmmaSp<BN>::template run<0>(acc, a0, desc, e);
    WgmmaSp<BN>::template run<1>(acc, a1, desc + 4, e);  // +64 bytes: k 32..63 of the swizzled rows
    wgmma_commit();
  };

  uint32_t fa0[4], fa1[4], fb0[4], fb1[4];  // A fragments of two consecutive k tiles (in flight while the next issues)
  auto step = [&](int kt, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
    cp_async_wait<P - 1>();
    fence_proxy_async();
    __syncthreads();
    {
      const int nk = kt + P;
      if (nk < KT) load_stage(nk % STAGES, nk);
      cp_async_commit();
    }
    compute(kt, a0, a1);
    wgmma_wait<1>();
  };
  int kt = 0;
  for (; kt + 1 < KT; kt += 2) {
    step(kt, fa0, fa1);
    step(kt + 1, fb0, fb1);
  }
  if (kt < KT) step(kt, fa0, fa1);
  wgmma_wait<0>();
  cp_async_wait<0>();
  __syncthreads();

  // epilogue: registers -> smem C[BN][BM+8] (token-major) -> 16-byte stores of Y rows
  half* cs = reinterpret_cast<half*>(smem);
  constexpr int LDC = BM + 8;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = r_tile * 16 + g + ((i >> 1) << 3);
      const int tk = j * 8 + 2 * q + (i & 1);
      cs[tk * LDC + m] = __float2half_rn(acc[j][i]);
    }
  __syncthreads();
  const int row0 = tm * BM;
  if ((N & 7) == 0) {
    constexpr int cpr = BM / 8;
    for (int i = tid; i < BN * cpr; i += C::kThreads) {
      const int tk = i / cpr, c = i % cpr;
      const int tok = tok0 + tk, col = row0 + c * 8;
      if (tok < M && col < N)
        *reinterpret_cast<uint4*>(Y + (size_t)tok * N + col) = *reinterpret_cast<const uint4*>(cs + tk * LDC + c * 8);
    }
  } else {
    for (int i = tid; i < BN * BM; i += C::kThreads) {
      const int tk = i / BM, c = i % BM;
      const int tok = tok0 + tk, col = row0 + c;
      if (tok < M && col < N) Y[(size_t)tok * N + col] = cs[tk * LDC + c];
    }
  }
}


// ------------------------------------------------------------------------------------------------ Hopper GEMM, warp-specialized
// gemm_ws_body (sm_90a, sp16): the same math as gemm_wgmma_body (2:4 weight = sparse A operand of wgmma.mma_async.sp
// from REGISTERS in the mma.sp fragment layout, activations = dense B operand read by the tensor core from shared
// memory through a 128-byte-swizzle K-major descriptor), but with a warp-specialized TMA pipeline:
//   - 3 warpgroups (384 threads). Warpgroup 0 is the producer (setmaxnreg.dec 40): its warp 0 fills stages, the other
//     three warps only release their registers and finish. Warpgroups 1 and 2 are consumers (setmaxnreg.inc 232),
//     each owning BM/2 weight rows (1 or 2 m64 slabs) x all BN tokens.
//   - stage s = X tile [BN tokens][BK k] as BK/64 TMA boxes {64 k, BN tokens} (CU_TENSOR_MAP_SWIZZLE_128B: 16-byte
//     chunk c of row r lands at chunk c ^ (r & 7), exactly the layout sw128_desc describes; rows >= M and k >= K are
//     zero-filled by TMA) + the weight fragments and metadata of the block's BM/16 row tiles, which are contiguous in
//     global memory per row tile (prepare_sp16's layout), loaded with one cp.async.bulk per row tile and array.
//   - full[s] (1 arrival: the producer's arrive.expect_tx of the stage's byte count, plus the copies' complete_tx)
//     and empty[s] (one arrival per consumer warp, after the wgmma group that read the stage has completed).
//     Consumers wait on full[s] with parity (kt / STAGES) & 1; the producer refills stage s for k tile kt >= STAGES
//     after waiting on empty[s] with parity (kt / STAGES - 1) & 1 (the consumers' release of k tile kt - STAGES).
//   - consumers keep one wgmma group in flight: k tile kt is issued, then wgmma.wait_group 1 retires kt - 1 and its
//     stage is released. A fragments are double-buffered in registers (the in-flight group still reads its own).
// TMA counts the whole box (OOB zeros included) towards complete_tx, so every stage delivers exactly kTxBytes. Weight
// row tiles past the last one are clamped to it (valid memory; those rows are never stored). The k tiles cover the
// real K (ceil(K / BK)); the prepared weight is zero past K up to its 128-aligned padded width.
template <int BM, int BN, int BK, int STAGES, bool PERSIST = false, int CLUSTER = 1, bool TAIL = false,
          bool DENSE = false>
struct WsCfg {
  static constexpr int kConsumers = 2;                  // consumer warpgroups
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kSlabs = BM / 64 / kConsumers;   // m64 slabs per consumer warpgroup
  static constexpr int kSteps = BK / 32;                // k32 steps per stage
  static constexpr int kAtoms = BK / 64;                // 64-wide swizzle atoms (TMA boxes) per stage
  static constexpr int kRowTiles = BM / 16;
  static constexpr int kXBytes = BN * BK * 2;
  // A per row tile and k32 step: 512 bytes of compressed 2:4 fragments, or (DENSE) 1024 bytes = two k16 units of
  // dense fragments; no metadata when dense
  static constexpr int kAStep = DENSE ? 1024 : 512;
  static constexpr int kABytes = kRowTiles * kSteps * kAStep;
  static constexpr int kMetaBytes = DENSE ? 0 : kRowTiles * (kSteps / 2) * 128;
  static constexpr int kTxBytes = kXBytes + kABytes + kMetaBytes;  // bytes one stage's copies deliver
  static constexpr int kStageBytes = (kTxBytes + 1023) / 1024 * 1024;
  static constexpr int kCBytes = BN * (BM + 8) * 2;
  static constexpr int kBarBytes = 256;  // full[STAGES], empty[STAGES] at the start of dynamic smem
  // C[BN][BM+8] reuses the stage memory (one tile per CTA), or has its own region after the stages (PERSIST: the
  // producer already fills stages for the CTA's next tile while the consumers run the epilogue)
  static constexpr int kCOffset = PERSIST ? STAGES * kStageBytes : 0;
  static constexpr int kData = PERSIST ? STAGES * kStageBytes + kCBytes
                                       : (STAGES * kStageBytes > kCBytes ? STAGES * kStageBytes : kCBytes);
  static constexpr int kSmem = kBarBytes + 1024 + kData;  // + 1024: the data region is aligned up to 1024 bytes
  // registers per thread: 168 at launch (65536 / 384, rounded down to 8, one CTA per SM); setmaxnreg moves 128 per
  // producer thread to the consumers: 40 / 232 (256 * (232 - 168) == 128 * (168 - 40), the whole pool)
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(kSlabs >= 1 && BM == 64 * kSlabs * kConsumers, "BM = 128 or 256");
  static_assert(BN == 128 || BN == 256, "BN = 128 or 256 (TMA box rows <= 256)");
  static_assert(BK == 64 || BK == 128, "BK = 64 or 128");
  static_assert(STAGES >= 2 && 16 * STAGES <= kBarBytes, "stages");
  static_assert(2 * kRowTiles <= 32, "one producer lane per weight/metadata bulk copy");
  static_assert(kSlabs * BN / 2 <= 128, "accumulator registers per consumer thread");
  static_assert(kTxBytes < (1 << 20), "mbarrier tx-count range");
  // CLUSTER = 2: two CTAs (consecutive weight-row tiles, same token tile) share the X tile: each loads BN/2 of its
  // rows by TMA multicast into both; the empty barriers then also count the peer's consumer warps
  static_assert(CLUSTER == 1 || (CLUSTER == 2 && !PERSIST), "cluster of 2 (one tile per CTA) or none");
  static constexpr int kBoxRows = BN / CLUSTER;
  static constexpr int kEmptyArrivals = 4 * kConsumers * CLUSTER;
  static_assert((kSteps * kAStep) % 16 == 0 && ((kSteps / 2) * 128) % 16 == 0, "bulk copy sizes");
  static_assert(!DENSE || (!PERSIST && CLUSTER == 1), "dense: one tile per CTA, no cluster");
  // TAIL: the tiles of the last, partial wave are split along K (see gemm_ws_body); one tile per CTA, no cluster.
  // The "am I the last split of this tile" flag lives in the last word of the barrier region.
  static_assert(!TAIL || (!PERSIST && CLUSTER == 1), "tail split: one tile per CTA, no cluster");
  static constexpr int kFlagOffset = kBarBytes - 8;
  static_assert(!TAIL || 16 * STAGES <= kFlagOffset, "tail split: the flag word must not overlap the mbarriers");
  static constexpr int kAccPerThread = kSlabs * (BN / 8) * 4;  // fp32 accumulators per consumer thread
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spin until the phase of parity `parity` has completed. The loop is one asm statement (labels are local to its
// { } scope), so the warp leaves it converged for the .aligned instructions (wgmma) that follow.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nSPARSEC_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra SPARSEC_MBAR_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// TMA: box {c0 (inner, k), c1 (tokens)} of the tensor map -> shared memory, completion counted on bar
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
// TMA: box {c0, c1, c2} of a rank-3 tensor map (no swizzle) -> shared memory, completion counted on bar
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// the same box, written at the same shared-memory offset of every CTA in cta_mask, complete_tx on the mbarrier at
// the same offset in each of them
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1,
                                                      uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// arrive on the mbarrier at the same shared-memory offset in CTA `cta` of the cluster
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
      "r"(cta)
      : "memory");
}
__device__ __forceinline__ void prefetch_tmap(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
// %tid.x / %ctaid.x read again (asm volatile: never merged with an earlier read)
__device__ __forceinline__ int fresh_tid_x() {
  int r;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ int fresh_ctaid_x() {
  int r;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(r));
  return r;
}
#endif

// TAIL (one tile per CTA): the grid is n_dp whole tiles (output tiles 0 .. n_dp-1, one per CTA) followed by
// (n_tiles - n_dp) * n_split split units: unit u computes tile n_dp + u / n_split over the k tiles
// split_range(KT, n_split, u % n_split) only. Every split unit writes its fp32 partial tile to the workspace Ws
// ([tail tile][split][accumulator][consumer thread]), then counts itself in Cnt[tail tile]; the last one to arrive
// sums the n_split partials in split order (deterministic: the same sum whichever unit comes last), runs the usual
// epilogue and resets the counter to 0 for the next launch. The launcher chooses n_dp / n_split (ws_tail_plan) so
// that the last wave's few tiles are spread over the idle SMs.
constexpr int kWsMaxSplit = 8;  // most split units of one tail tile (cuda_sparse.WS_TAIL_SPLITS)
// CTA b of a tail-split grid: its output tile, and for a split unit (b >= n_dp) the tail tile's index and its split
struct WsTailUnit {
  int tile, tail_tile, split;  // tail_tile = -1: a whole tile
};
__device__ __forceinline__ WsTailUnit ws_tail_unit(int b, int n_dp, int n_split) {
  if (b < n_dp) return {b, -1, 0};
  const int u = b - n_dp;
  return {n_dp + u / n_split, u / n_split, u % n_split};
}
// WMAP: the weight fragments (and metadata) of a stage arrive by one rank-3 TMA box each instead of one cp.async.bulk
// per row tile and array (2 * BM / 16 small copies a stage). The prepared weight, per row tile T k32 steps of kAStep
// bytes, is the tensor {64 x 8 bytes, T * kAStep / 512 units, row tiles}; a stage is the box {64, S * kAStep / 512,
// BM / 16} at {0, kt * S * kAStep / 512, first row tile}, which TMA writes [row tile][unit][512 bytes]: the same
// shared-memory layout the bulk copies write. The metadata likewise: {16 x 8 bytes, T / 2, row tiles}, box
// {16, S / 2, BM / 16}. Row tiles past the weight's last are zero-filled (and counted in complete_tx), not clamped;
// those rows are never stored (a block wholly past them, possible only in a cluster's rounding, starts at the last
// row tile). Tensor maps: cuda_sparse.tma_w_params (the launcher encodes them per call).
template <int BM, int BN, int BK, int STAGES, bool PERSIST, int CLUSTER, bool TAIL = false, bool DENSE = false,
          bool WMAP = false>
__device__ __forceinline__ void gemm_ws_body(const CUtensorMap* tmap, const CUtensorMap* wmap, const CUtensorMap* mmap,
                                             const uint4* __restrict__ Wv,
                                             const uint32_t* __restrict__ Wm, half* __restrict__ Y, int M, int N,
                                             int K, int T, int GROUP, int n_dp = 0, int n_split = 1,
                                             float* __restrict__ Ws = nullptr, unsigned* __restrict__ Cnt = nullptr) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WsCfg<BM, BN, BK, STAGES, PERSIST, CLUSTER, TAIL, DENSE>;
  constexpr int S = C::kSteps, SL = C::kSlabs;
  extern __shared__ __align__(1024) unsigned char ws_smem[];
  const uint32_t raw = smem_u32(ws_smem);
  const uint32_t data = (raw + C::kBarBytes + 1023) & ~1023u;  // 1024-aligned: 128B-swizzle atoms
  unsigned char* const dptr = ws_smem + (data - raw);
  auto full = [&](int s) { return raw + 8u * s; };
  auto empty = [&](int s) { return raw + 8u * (STAGES + s); };

  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wwarp = (tid >> 5) & 3;
  const int n_rt = (N + 15) >> 4;
  // CLUSTER = 2: the grid holds 2 CTAs per (pair of weight-row tiles, token tile); rank r takes row tile 2 * tmc + r
  // (past the last row tile it clamps its weight loads and stores nothing, but still loads its half of X)
  const int crank = CLUSTER == 2 ? cluster_ctarank() : 0;
  const int tiles_m = (n_rt * 16 + BM * CLUSTER - 1) / (BM * CLUSTER), tiles_n = (M + BN - 1) / BN;
  const int n_tiles = tiles_m * tiles_n;
  const int per_group = GROUP * tiles_n;
  // grouped rasterization of output tile `pid` -> (weight-row tile tm, token tile tn), as gemm_wgmma_body
  auto tile_of = [&](int pid, int& tm, int& tn) {
    const int first_m = (pid / per_group) * GROUP;
    const int gsize = min(tiles_m - first_m, GROUP);
    tm = (first_m + (pid % per_group) % gsize) * CLUSTER + crank;
    tn = (pid % per_group) / gsize;
  };
  // k tiles over the real K: past K the weight is zero padding (prepare pads K to 128, so (KT * BK) <= T * 32), and
  // the last tile's X box is partially out of bounds at most (TMA zero-fills k >= K); no box lies entirely outside
  const int KT = (K + BK - 1) / BK;
  // tiles of this CTA: blockIdx.x / CLUSTER, + gridDim.x / CLUSTER, ... (one tile unless PERSIST: the launcher then
  // starts one CTA per SM). Stage / phase bookkeeping runs on `it`, the CTA's k-tile counter over all its tiles.
  // TAIL: one tile, whole (blockIdx.x < n_dp) or the k tiles [k_lo, k_hi) of a split unit. Evaluated by each role
  // after its setmaxnreg (the producer has 40 registers: nothing of this may stay live across the role split).
  struct Work {
    int t_first, t_step, t_end, k_lo, k_hi;
  };
  auto work = [&]() -> Work {
    Work w{static_cast<int>(blockIdx.x) / CLUSTER, static_cast<int>(gridDim.x) / CLUSTER, n_tiles, 0, KT};
    if constexpr (TAIL) {
      const WsTailUnit tu = ws_tail_unit(fresh_ctaid_x(), n_dp, n_split);
      w.t_first = tu.tile;
      if (tu.tail_tile >= 0) {
        w.k_lo = (KT * tu.split) / n_split;
        w.k_hi = (KT * (tu.split + 1)) / n_split;
      }
      w.t_step = 1;
      w.t_end = w.t_first + 1;
    }
    return w;
  };

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), C::kEmptyArrivals);
    }
    mbar_fence_init();
  }
  // the last CTA-wide (cluster-wide) barrier: after the role split only mbarriers and named barrier 1 are used. With a
  // cluster the peer's barriers must be initialised before its multicasts / remote arrivals can reach them.
  if constexpr (CLUSTER == 2) cluster_sync();
  else __syncthreads();

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    setmaxnreg_dec<C::kProducerRegs>();
    if (wwarp != 0) return;  // warps 1..3 of the producer warpgroup have nothing to do
    if (lane == 0) {
      prefetch_tmap(tmap);
      if constexpr (WMAP) {
        prefetch_tmap(wmap);
        if constexpr (!DENSE) prefetch_tmap(mmap);
      }
    }
    const Work wk = work();
    int it = 0;
    for (int tile = wk.t_first; tile < wk.t_end; tile += wk.t_step) {
    int tm, tn;
    tile_of(tile, tm, tn);
    const int row_tile0 = tm * C::kRowTiles, tok0 = tn * BN;
    for (int kt = wk.k_lo; kt < wk.k_hi; ++kt, ++it) {
      const int s = it % STAGES;
      if (it >= STAGES) mbar_wait(empty(s), ((it / STAGES) - 1) & 1);
      const uint32_t base = data + s * C::kStageBytes;
      if (lane == 0) {
        mbar_arrive_expect_tx(full(s), C::kTxBytes);  // the whole X tile: both halves land here (CLUSTER = 2)
#pragma unroll
        for (int h = 0; h < C::kAtoms; ++h) {
          const uint32_t dst = base + h * BN * 128 + crank * (C::kBoxRows * 128);
          if constexpr (CLUSTER == 2)
            tma_load_2d_multicast(dst, tmap, full(s), kt * BK + h * 64, tok0 + crank * C::kBoxRows, 0x3);
          else
            tma_load_2d(dst, tmap, full(s), kt * BK + h * 64, tok0);
        }
        if constexpr (WMAP) {
          // a box never lies wholly past the last row tile: the rank-1 CTA of a cluster past the weight's rows
          // (whole clusters) starts its box at the last row tile instead; it stores nothing, as with the bulk copies
          const int rt0 = min(row_tile0, n_rt - 1);
          tma_load_3d(base + C::kXBytes, wmap, full(s), 0, kt * (S * C::kAStep / 512), rt0);
          if constexpr (!DENSE) tma_load_3d(base + C::kXBytes + C::kABytes, mmap, full(s), 0, kt * (S / 2), rt0);
        }
      }
      __syncwarp();
      if constexpr (!WMAP) {
        if (lane < C::kRowTiles) {
          const int rt = min(row_tile0 + lane, n_rt - 1);
          bulk_load(base + C::kXBytes + lane * (S * C::kAStep), Wv + ((size_t)rt * T + (size_t)kt * S) * (C::kAStep / 16),
                    S * C::kAStep, full(s));
        } else if (!DENSE && lane < 2 * C::kRowTiles) {
          const int r = lane - C::kRowTiles;
          const int rt = min(row_tile0 + r, n_rt - 1);
          bulk_load(base + C::kXBytes + C::kABytes + r * ((S / 2) * 128),
                    Wm + ((size_t)rt * (T / 2) + (size_t)kt * (S / 2)) * 32, (S / 2) * 128, full(s));
        }
      }
    }
    }
    if constexpr (CLUSTER == 2) {
      // do not exit (freeing this CTA's shared memory) before every consumer warp of both CTAs has released every
      // stage this producer filled: the peer's remote arrivals on our empty barriers must have landed
      for (int i = 0; i < STAGES; ++i, ++it)
        if (it >= STAGES) mbar_wait(empty(it % STAGES), ((it / STAGES) - 1) & 1);
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  setmaxnreg_inc<C::kConsumerRegs>();
  const int cw = wg - 1;  // consumer warpgroup 0/1
  const int g = lane >> 2, q = lane & 3;
  float acc[SL][BN / 8][4];

  // k iteration it: wait for its stage, A fragments + metadata smem -> registers, issue S x SL wgmma.sp, commit
  constexpr int AR = DENSE ? 8 : 4;  // A registers per warp and k32 step
  // A of row tile rtile, k32 step st, fragment h (dense: k16 unit 2 st + h) at ((rtile * S + st) * FR + h) * 32 + lane
  constexpr int FR = AR / 4;  // 16-byte A fragments per k32 step: 1 (2:4), 2 (dense)
  auto issue = [&](int it, uint32_t (&a)[SL][S][AR]) {
    const int s = it % STAGES;
    mbar_wait(full(s), (it / STAGES) & 1);
    const unsigned char* base = dptr + s * C::kStageBytes;
    uint32_t e[SL][DENSE ? 1 : S / 2];  // 2:4 metadata (none when dense)
#pragma unroll
    for (int j = 0; j < SL; ++j) {
      const int rtile = (cw * SL + j) * 4 + wwarp;  // 16-row tile of this warp inside the block
#pragma unroll
      for (int st = 0; st < S; ++st)
#pragma unroll
        for (int h = 0; h < FR; ++h) {
          const uint4 v =
              *reinterpret_cast<const uint4*>(base + C::kXBytes + ((size_t)((rtile * S + st) * FR + h) * 32 + lane) * 16);
          a[j][st][4 * h] = v.x; a[j][st][4 * h + 1] = v.y; a[j][st][4 * h + 2] = v.z; a[j][st][4 * h + 3] = v.w;
        }
      if constexpr (!DENSE) {
#pragma unroll
        for (int p = 0; p < S / 2; ++p)
          e[j][p] = *reinterpret_cast<const uint32_t*>(base + C::kXBytes + C::kABytes +
                                                       ((size_t)(rtile * (S / 2) + p) * 32 + lane) * 4);
      }
    }
    wgmma_fence();  // the A registers were just written by ordinary loads
    const uint32_t xs = data + s * C::kStageBytes;
#pragma unroll
    for (int st = 0; st < S; ++st) {
#pragma unroll
      for (int h = 0; h < FR; ++h) {
        // +64 B (4 x 16) for k 32..63 of the 64-k swizzle atom; dense: +32 B for the second k16 unit
        const uint64_t desc = sw128_desc(xs + (st >> 1) * (BN * 128)) + 4 * (st & 1) + 2 * h;
#pragma unroll
        for (int j = 0; j < SL; ++j) {
          const uint32_t(&af)[4] = *reinterpret_cast<const uint32_t(*)[4]>(&a[j][st][4 * h]);
          if constexpr (DENSE) WgmmaDense<BN>::run(acc[j], af, desc);
          else if (st & 1) WgmmaSp<BN>::template run<1>(acc[j], af, desc, e[j][st >> 1]);
          else WgmmaSp<BN>::template run<0>(acc[j], af, desc, e[j][st >> 1]);
        }
      }
    }
    wgmma_commit();
  };
  auto release = [&](int it) {  // the wgmma group of iteration it has completed: its stage may be refilled
    __syncwarp();
    if (lane == 0) {
      mbar_arrive(empty(it % STAGES));
      if constexpr (CLUSTER == 2) mbar_arrive_cluster(empty(it % STAGES), crank ^ 1);  // the peer multicasts here too
    }
  };
  uint32_t fa[SL][S][AR], fb[SL][S][AR];
  half* const cs = reinterpret_cast<half*>(dptr + C::kCOffset);
  constexpr int kCT = 128 * C::kConsumers, kWsFloats = C::kAccPerThread * kCT;  // consumer threads, floats a partial
  constexpr int LDC = BM + 8;
  int it = 0;
  const Work wk = work();
  const int NK = wk.k_hi - wk.k_lo;  // k tiles per output tile of this CTA
  for (int tile = wk.t_first; tile < wk.t_end; tile += wk.t_step) {
  int tm, tn;
  tile_of(tile, tm, tn);
#pragma unroll
  for (int j = 0; j < SL; ++j)
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][n][i] = 0.f;
  // two k tiles per trip (A registers fa / fb alternate); after issuing one, wgmma.wait_group 1 retires the other
  int kt = 0;
  for (; kt + 1 < NK; kt += 2, it += 2) {
    issue(it, fa);
    wgmma_wait<1>();
    if (kt > 0) release(it - 1);
    issue(it + 1, fb);
    wgmma_wait<1>();
    release(it);
  }
  wgmma_wait<0>();
  if (kt > 0) release(it - 1);
  if (kt < NK) {  // odd number of k tiles (BK = 128 and Kp / 128 odd, or a split unit's range): the last one alone
    issue(it, fa);
    wgmma_wait<0>();
    release(it);
    ++it;
  }
  // The epilogue's thread and tile indices. TAIL: recomputed from fresh %tid.x / %ctaid.x reads (the compiler cannot
  // merge those with the ones before the main loop), so they need no registers across it: the tail path's own code
  // left the consumers of the 256x128 tile (up to 223 of their 232 registers in the main loop) a few short, and
  // ptxas spilled these indices.
  const int etid = TAIL ? fresh_tid_x() : tid;
  const int ecw = (etid >> 7) - 1, ewarp = (etid >> 5) & 3, eg = (etid & 31) >> 2, eq = etid & 3;
  int etm = tm, etn = tn;
  if constexpr (TAIL) {
    const WsTailUnit tu = ws_tail_unit(fresh_ctaid_x(), n_dp, n_split);
    tile_of(tu.tile, etm, etn);
    // a split unit: partial -> workspace, count in; only the last unit of the tile goes on
    if (tu.tail_tile >= 0) {
      const int tail_tile = tu.tail_tile, split = tu.split;
      const int ctid = etid - 128;
      // layout of a partial: float4 (j * BN/8 + n) * kCT + t holds acc[j][n][0..3] of consumer thread t
      float4* const mine = reinterpret_cast<float4*>(Ws + ((size_t)tail_tile * n_split + split) * kWsFloats) + ctid;
#pragma unroll
      for (int j = 0; j < SL; ++j)
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
          __stcg(mine + (j * (BN / 8) + n) * kCT, make_float4(acc[j][n][0], acc[j][n][1], acc[j][n][2], acc[j][n][3]));
      __threadfence();
      named_bar_sync(1, kCT);
      volatile unsigned* const last = reinterpret_cast<volatile unsigned*>(ws_smem + C::kFlagOffset);
      if (ctid == 0) *last = atomicAdd(Cnt + tail_tile, 1u) == static_cast<unsigned>(n_split - 1) ? 1u : 0u;
      named_bar_sync(1, kCT);
      if (*last == 0u) return;
      __threadfence();
      // the last unit: acc = the sum of the n_split partials in split order (the same sum whichever unit arrives
      // last), each thread reading its own accumulators' float4s (coalesced across threads), a quarter of a
      // partial per round in flight; then the usual epilogue
      const float4* const src = reinterpret_cast<const float4*>(Ws + (size_t)tail_tile * n_split * kWsFloats) + ctid;
      constexpr int NJN = SL * (BN / 8), NH = 8, H = NJN / NH;
      auto add_partial = [&](int p, bool first) {
#pragma unroll
        for (int h = 0; h < NH; ++h) {
          float4 x[H];
#pragma unroll
          for (int q = 0; q < H; ++q) x[q] = __ldcg(src + (size_t)p * (kWsFloats / 4) + (h * H + q) * kCT);
#pragma unroll
          for (int q = 0; q < H; ++q) {
            float(&a)[4] = acc[(h * H + q) / (BN / 8)][(h * H + q) % (BN / 8)];
            a[0] = first ? x[q].x : a[0] + x[q].x;
            a[1] = first ? x[q].y : a[1] + x[q].y;
            a[2] = first ? x[q].z : a[2] + x[q].z;
            a[3] = first ? x[q].w : a[3] + x[q].w;
          }
        }
      };
      add_partial(0, true);  // (peeled: acc's own values are dead from here on)
      for (int p = 1; p < n_split; ++p) add_partial(p, false);
      if (ctid == 0) Cnt[tail_tile] = 0u;  // ready for the next launch (stream order)
    }
  }

  // epilogue: C[BN][BM+8] (token-major) -> 16-byte stores of Y rows. The barrier orders this tile's C writes after
  // every consumer thread's reads of the previous C (PERSIST) or after both warpgroups are done with the stage memory
  // that C reuses (all TMA writes were awaited, all wgmma retired).
  named_bar_sync(1, 128 * C::kConsumers);
#pragma unroll
  for (int j = 0; j < SL; ++j) {
    const int rtile = (ecw * SL + j) * 4 + ewarp;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = rtile * 16 + eg + ((i >> 1) << 3);
        const int tk = n * 8 + 2 * eq + (i & 1);
        cs[tk * LDC + m] = __float2half_rn(acc[j][n][i]);
      }
  }
  named_bar_sync(1, 128 * C::kConsumers);
  const int ctid = etid - 128, cthreads = 128 * C::kConsumers;
  const int row0 = etm * BM, tok0 = etn * BN;
  if ((N & 7) == 0) {
    constexpr int cpr = BM / 8;
    for (int i = ctid; i < BN * cpr; i += cthreads) {
      const int tk = i / cpr, c = i % cpr;
      const int tok = tok0 + tk, col = row0 + c * 8;
      if (tok < M && col < N)
        *reinterpret_cast<uint4*>(Y + (size_t)tok * N + col) = *reinterpret_cast<const uint4*>(cs + tk * LDC + c * 8);
    }
  } else {
    for (int i = ctid; i < BN * BM; i += cthreads) {
      const int tk = i / BM, c = i % BM;
      const int tok = tok0 + tk, col = row0 + c;
      if (tok < M && col < N) Y[(size_t)tok * N + col] = cs[tk * LDC + c];
    }
  }
  }
#else
  __trap();
#endif
}

}  // namespace sparsec
