/* wasm simd128 2:4 GEMV (M <= GEMV_MAX rows) in C, linked into model.wasm by backends/cross.py (link_wasm, simd128
 * builds only) and called by the TVM-generated cpu.nm_sparse / cpu.nm_group_quant kernels through T.call_extern
 * (backends/kernels/cpu.py, gemv_mode "swizzle", gemv_impl "c"); larger M runs the TVM kernel's own GEMM.
 *
 * Same prepared layout as the TIR swizzle kernel (cpu.py: _swizzle_positions / _swizzle_codes), 4 output rows of a
 * block in the 4 f32 lanes:
 *   Wv[O/4][J][4]  float32 kept values (fp32 format), or
 *   C[O/4][J/8][4] int32 words of 8 int4 codes (kept column 8q+k in bits 4k..4k+3) / C[O/4][J/4][4] of 4 int8 codes,
 *   S, Z[O/4][J/G][4] float32 scale / zero point of each group of G kept columns (w = (code - z) * s),
 *   I[O/4][J*4]    uint8, byte 4j + lane = 4 * position (0..3) of kept column j of row 4*ob + lane.
 * 16 bytes of I hold 4 kept columns (= 2 groups of 4 inputs) x 4 rows; a CONSTANT lane-spread swizzle copies byte
 * 4t + r into the 4 bytes of lane r, an or with 0,1,2,3 makes the byte mask that selects x[4g + position] per lane
 * from ONE v128 load of x[4g..4g+3]. The masks are wasm_i8x16_swizzle operands with v128.const masks: clang emits
 * i8x16.swizzle (V8: one pshufb), where TVM's LLVM turns a constant swizzle into an i8x16.shuffle that V8 runs
 * slowly (bench/results/wasm_gemv_variants.md: spread 1.66x vs dense, spread_shuf 1.11x, spread_mem 1.38x).
 * Needs J % 4 == 0 (fp32, int8) / J % 8 == 0 (int4) and G a multiple of the kept columns per code word. */
#include <stdint.h>
#include <wasm_simd128.h>

#define SPREAD(t) wasm_i8x16_const(4 * (t), 4 * (t), 4 * (t), 4 * (t), 4 * (t) + 1, 4 * (t) + 1, 4 * (t) + 1, 4 * (t) + 1, \
                                   4 * (t) + 2, 4 * (t) + 2, 4 * (t) + 2, 4 * (t) + 2, 4 * (t) + 3, 4 * (t) + 3, 4 * (t) + 3, 4 * (t) + 3)
#define OFF wasm_i8x16_const(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3)
#define MASK(pk, t) wasm_v128_or(wasm_i8x16_swizzle((pk), SPREAD(t)), OFF)
#define SEL(xv, mk) wasm_i8x16_swizzle((xv), (mk))
#define MADD(a, w, v) (a) = wasm_f32x4_add((a), wasm_f32x4_mul((w), (v)))

/* the 4 weights of kept columns 4c..4c+3 of block ob (bits 0: fp32; 4 / 8: codes dequantized with their group);
 * k0 (a constant after inlining) = (4c) % codes per word */
static inline __attribute__((always_inline)) void weights4(int bits, const float *Wv, const int32_t *C, const float *S,
                                                           const float *Z, int J, int G, int ob, int c, int k0, v128_t w[4]) {
  if (bits == 0) {
    const float *v = Wv + ((long)ob * J + 4 * c) * 4;
    for (int t = 0; t < 4; t++) w[t] = wasm_v128_load(v + 4 * t);
    return;
  }
  int per = bits == 4 ? 8 : 4, j0 = 4 * c;
  v128_t word = wasm_v128_load(C + ((long)ob * (J / per) + j0 / per) * 4);
  int g = j0 / G;
  v128_t s = wasm_v128_load(S + ((long)ob * (J / G) + g) * 4), z = wasm_v128_load(Z + ((long)ob * (J / G) + g) * 4);
  v128_t mk = wasm_i32x4_splat((1 << bits) - 1);
  for (int t = 0; t < 4; t++) {
    int sh = bits * (k0 + t);
    v128_t code = sh ? wasm_u32x4_shr(word, sh) : word;
    if (sh + bits < 32) code = wasm_v128_and(code, mk);
    w[t] = wasm_f32x4_mul(wasm_f32x4_sub(wasm_f32x4_convert_i32x4(code), z), s);
  }
}

static inline __attribute__((always_inline)) void gemv24(int bits, const float *x, const float *Wv, const int32_t *C,
                                                         const float *S, const float *Z, const uint8_t *I,
                                                         const float *B, float *y, int M, int O, int J, int G) {
  int K = 2 * J, NC = J / 4;
#define STEP (bits == 4 ? 2 : 1) /* int4: the 2 chunks of one code word per iteration (constant shifts) */
  for (int ob = 0; ob < O / 4; ob++) {
    const uint8_t *ib = I + (long)ob * J * 4;
    v128_t bias = B ? wasm_v128_load(B + 4 * ob) : wasm_f32x4_splat(0.0f);
    int m = 0;
    for (; m + 4 <= M; m += 4) { /* 4 rows: masks and weights decoded once, one accumulator per row */
      const float *x0 = x + (long)m * K;
      v128_t a0 = wasm_f32x4_splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
      for (int c2 = 0; c2 < NC; c2 += STEP) _Pragma("clang loop unroll(full)") for (int h = 0; h < STEP; h++) {
        int c = c2 + h;
        v128_t pk = wasm_v128_load(ib + 16 * c), w[4];
        v128_t k0 = MASK(pk, 0), k1 = MASK(pk, 1), k2 = MASK(pk, 2), k3 = MASK(pk, 3);
        weights4(bits, Wv, C, S, Z, J, G, ob, c, 4 * h, w);
        const float *xr = x0 + 8 * c;
        v128_t xg, xh;
        xg = wasm_v128_load(xr), xh = wasm_v128_load(xr + 4);
        MADD(a0, w[0], SEL(xg, k0)); MADD(a0, w[1], SEL(xg, k1)); MADD(a0, w[2], SEL(xh, k2)); MADD(a0, w[3], SEL(xh, k3));
        xg = wasm_v128_load(xr + K), xh = wasm_v128_load(xr + K + 4);
        MADD(a1, w[0], SEL(xg, k0)); MADD(a1, w[1], SEL(xg, k1)); MADD(a1, w[2], SEL(xh, k2)); MADD(a1, w[3], SEL(xh, k3));
        xg = wasm_v128_load(xr + 2 * K), xh = wasm_v128_load(xr + 2 * K + 4);
        MADD(a2, w[0], SEL(xg, k0)); MADD(a2, w[1], SEL(xg, k1)); MADD(a2, w[2], SEL(xh, k2)); MADD(a2, w[3], SEL(xh, k3));
        xg = wasm_v128_load(xr + 3 * K), xh = wasm_v128_load(xr + 3 * K + 4);
        MADD(a3, w[0], SEL(xg, k0)); MADD(a3, w[1], SEL(xg, k1)); MADD(a3, w[2], SEL(xh, k2)); MADD(a3, w[3], SEL(xh, k3));
      }
      wasm_v128_store(y + (long)m * O + 4 * ob, wasm_f32x4_add(a0, bias));
      wasm_v128_store(y + (long)(m + 1) * O + 4 * ob, wasm_f32x4_add(a1, bias));
      wasm_v128_store(y + (long)(m + 2) * O + 4 * ob, wasm_f32x4_add(a2, bias));
      wasm_v128_store(y + (long)(m + 3) * O + 4 * ob, wasm_f32x4_add(a3, bias));
    }
    for (; m < M; m++) { /* one row (decode): 4 accumulators (add latency) */
      const float *xr = x + (long)m * K;
      v128_t a0 = wasm_f32x4_splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
      for (int c2 = 0; c2 < NC; c2 += STEP) _Pragma("clang loop unroll(full)") for (int h = 0; h < STEP; h++) {
        int c = c2 + h;
        v128_t pk = wasm_v128_load(ib + 16 * c), w[4];
        weights4(bits, Wv, C, S, Z, J, G, ob, c, 4 * h, w);
        v128_t xg = wasm_v128_load(xr + 8 * c), xh = wasm_v128_load(xr + 8 * c + 4);
        MADD(a0, w[0], SEL(xg, MASK(pk, 0)));
        MADD(a1, w[1], SEL(xg, MASK(pk, 1)));
        MADD(a2, w[2], SEL(xh, MASK(pk, 2)));
        MADD(a3, w[3], SEL(xh, MASK(pk, 3)));
      }
      wasm_v128_store(y + (long)m * O + 4 * ob, wasm_f32x4_add(wasm_f32x4_add(wasm_f32x4_add(a0, a1), wasm_f32x4_add(a2, a3)), bias));
    }
  }
}

/* All sizes are int32 and pointers wasm32 addresses: the signatures T.call_extern declares (cpu.py, _c_gemv_call). */
int32_t sparsec_swz24_f32(const float *x, const float *Wv, const uint8_t *I, const float *B, float *y, int32_t M, int32_t O,
                          int32_t J, int32_t has_bias) {
  gemv24(0, x, Wv, 0, 0, 0, I, has_bias ? B : 0, y, M, O, J, 4);
  return 0;
}

int32_t sparsec_swz24_int4(const float *x, const int32_t *C, const float *S, const float *Z, const uint8_t *I, const float *B,
                           float *y, int32_t M, int32_t O, int32_t J, int32_t G, int32_t has_bias) {
  gemv24(4, x, 0, C, S, Z, I, has_bias ? B : 0, y, M, O, J, G);
  return 0;
}

int32_t sparsec_swz24_int8(const float *x, const int32_t *C, const float *S, const float *Z, const uint8_t *I, const float *B,
                           float *y, int32_t M, int32_t O, int32_t J, int32_t G, int32_t has_bias) {
  gemv24(8, x, 0, C, S, Z, I, has_bias ? B : 0, y, M, O, J, G);
  return 0;
}
