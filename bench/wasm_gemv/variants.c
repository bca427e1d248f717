/* Exploratory wasm simd128 2:4 GEMV variants (M = 1, 4 output rows per f32x4), timed by
 * bench/bench_wasm_gemv_variants.py against dense loops in one node process. The variant sparsec generates through TVM
 * (backends/kernels/cpu.py, gemv_mode="swizzle") is nm_spread_mem; the others are the alternatives measured to pick it.
 * Not part of the compiler. */
#include <wasm_simd128.h>
#include <stdint.h>
#define EXPORT __attribute__((visibility("default")))
static unsigned char heap[64<<20]; static unsigned long hp = 0;
EXPORT void* balloc(int n){ void* p = heap + hp; hp += (n + 63) & ~63; return p; }
/* dense: W[O/4][K][4] */
EXPORT void dense(const float* x, const float* W, float* y, int O, int K) {
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0;
    const float* w = W + (long)ob*K*4;
    for (int k = 0; k < K; k += 2) {
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(w + 4*k), wasm_v128_load32_splat(x + k)));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(w + 4*k+4), wasm_v128_load32_splat(x + k+1)));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(a0, a1));
  }
}
/* A: full masks. V[O/4][G][2][4] values, Mk[O/4][G][2][16] masks */
EXPORT void nm_masks(const float* x, const float* V, const uint8_t* Mk, float* y, int O, int K) {
  int G = K/4;
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0;
    const float* v = V + (long)ob*G*8; const uint8_t* m = Mk + (long)ob*G*32;
    for (int g = 0; g < G; g++) {
      v128_t xg = wasm_v128_load(x + 4*g);
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(v + 8*g), wasm_i8x16_swizzle(xg, wasm_v128_load(m + 32*g))));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(v + 8*g+4), wasm_i8x16_swizzle(xg, wasm_v128_load(m + 32*g+16))));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(a0, a1));
  }
}
/* B: compact 8 bytes per (4 rows, group): C[O/4][G/2][16]: for group pair (g0,g1): bytes [t0 g0 r0..3, t1 g0 r0..3, t0 g1.., t1 g1..], each 4*p */
EXPORT void nm_spread(const float* x, const float* V, const uint8_t* C, float* y, int O, int K) {
  int G = K/4;
  const v128_t off = wasm_i8x16_const(0,1,2,3,0,1,2,3,0,1,2,3,0,1,2,3);
  const v128_t s0 = wasm_i8x16_const(0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3);
  const v128_t s1 = wasm_i8x16_const(4,4,4,4,5,5,5,5,6,6,6,6,7,7,7,7);
  const v128_t s2 = wasm_i8x16_const(8,8,8,8,9,9,9,9,10,10,10,10,11,11,11,11);
  const v128_t s3 = wasm_i8x16_const(12,12,12,12,13,13,13,13,14,14,14,14,15,15,15,15);
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    const float* v = V + (long)ob*G*8; const uint8_t* c = C + (long)ob*G*8;
    for (int g = 0; g < G; g += 2) {
      v128_t cc = wasm_v128_load(c + 8*g);
      v128_t xg = wasm_v128_load(x + 4*g), xh = wasm_v128_load(x + 4*g + 4);
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(v + 8*g), wasm_i8x16_swizzle(xg, wasm_v128_or(wasm_i8x16_swizzle(cc, s0), off))));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(v + 8*g+4), wasm_i8x16_swizzle(xg, wasm_v128_or(wasm_i8x16_swizzle(cc, s1), off))));
      a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(v + 8*g+8), wasm_i8x16_swizzle(xh, wasm_v128_or(wasm_i8x16_swizzle(cc, s2), off))));
      a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(v + 8*g+12), wasm_i8x16_swizzle(xh, wasm_v128_or(wasm_i8x16_swizzle(cc, s3), off))));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(wasm_f32x4_add(a0, a1), wasm_f32x4_add(a2, a3)));
  }
}
/* B: compact 8 bytes per (4 rows, group): C[O/4][G/2][16]: for group pair (g0,g1): bytes [t0 g0 r0..3, t1 g0 r0..3, t0 g1.., t1 g1..], each 4*p */
EXPORT void nm_spread_shuf(const float* x, const float* V, const uint8_t* C, float* y, int O, int K) {
  int G = K/4;
  const v128_t off = wasm_i8x16_const(0,1,2,3,0,1,2,3,0,1,2,3,0,1,2,3);
  const v128_t s0 = wasm_i8x16_const(0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3);
  const v128_t s1 = wasm_i8x16_const(4,4,4,4,5,5,5,5,6,6,6,6,7,7,7,7);
  const v128_t s2 = wasm_i8x16_const(8,8,8,8,9,9,9,9,10,10,10,10,11,11,11,11);
  const v128_t s3 = wasm_i8x16_const(12,12,12,12,13,13,13,13,14,14,14,14,15,15,15,15);
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    const float* v = V + (long)ob*G*8; const uint8_t* c = C + (long)ob*G*8;
    for (int g = 0; g < G; g += 2) {
      v128_t cc = wasm_v128_load(c + 8*g);
      v128_t xg = wasm_v128_load(x + 4*g), xh = wasm_v128_load(x + 4*g + 4);
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(v + 8*g), wasm_i8x16_swizzle(xg, wasm_v128_or(wasm_i8x16_shuffle(cc, cc, 0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3), off))));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(v + 8*g+4), wasm_i8x16_swizzle(xg, wasm_v128_or(wasm_i8x16_shuffle(cc, cc, 4,4,4,4,5,5,5,5,6,6,6,6,7,7,7,7), off))));
      a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(v + 8*g+8), wasm_i8x16_swizzle(xh, wasm_v128_or(wasm_i8x16_shuffle(cc, cc, 8,8,8,8,9,9,9,9,10,10,10,10,11,11,11,11), off))));
      a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(v + 8*g+12), wasm_i8x16_swizzle(xh, wasm_v128_or(wasm_i8x16_shuffle(cc, cc, 12,12,12,12,13,13,13,13,14,14,14,14,15,15,15,15), off))));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(wasm_f32x4_add(a0, a1), wasm_f32x4_add(a2, a3)));
  }
}
/* C: table: one byte per (4 rows, group, t): code = sum p_r << 2r; TB[256][16] */
EXPORT void nm_table(const float* x, const float* V, const uint8_t* I, const uint8_t* TB, float* y, int O, int K) {
  int G = K/4;
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0;
    const float* v = V + (long)ob*G*8; const uint8_t* c = I + (long)ob*G*2;
    for (int g = 0; g < G; g++) {
      v128_t xg = wasm_v128_load(x + 4*g);
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(v + 8*g), wasm_i8x16_swizzle(xg, wasm_v128_load(TB + 16*c[2*g]))));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(v + 8*g+4), wasm_i8x16_swizzle(xg, wasm_v128_load(TB + 16*c[2*g+1]))));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(a0, a1));
  }
}
/* dense with 4 accumulators */
EXPORT void dense4(const float* x, const float* W, float* y, int O, int K) {
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    const float* w = W + (long)ob*K*4;
    for (int k = 0; k < K; k += 4) {
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(w + 4*k), wasm_v128_load32_splat(x + k)));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(w + 4*k+4), wasm_v128_load32_splat(x + k+1)));
      a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(w + 4*k+8), wasm_v128_load32_splat(x + k+2)));
      a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(w + 4*k+12), wasm_v128_load32_splat(x + k+3)));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(wasm_f32x4_add(a0, a1), wasm_f32x4_add(a2, a3)));
  }
}
/* spread with masks from memory (like the TVM kernel) */
EXPORT void nm_spread_mem(const float* x, const float* V, const uint8_t* C, const uint8_t* SP, float* y, int O, int K) {
  int G = K/4;
  const v128_t off = wasm_i8x16_const(0,1,2,3,0,1,2,3,0,1,2,3,0,1,2,3);
  const v128_t s0 = wasm_v128_load(SP), s1 = wasm_v128_load(SP+16), s2 = wasm_v128_load(SP+32), s3 = wasm_v128_load(SP+48);
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    const float* v = V + (long)ob*G*8; const uint8_t* c = C + (long)ob*G*8;
    for (int g = 0; g < G; g += 2) {
      v128_t cc = wasm_v128_load(c + 8*g);
      v128_t xg = wasm_v128_load(x + 4*g), xh = wasm_v128_load(x + 4*g + 4);
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(v + 8*g), wasm_i8x16_swizzle(xg, wasm_v128_or(wasm_i8x16_swizzle(cc, s0), off))));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(v + 8*g+4), wasm_i8x16_swizzle(xg, wasm_v128_or(wasm_i8x16_swizzle(cc, s1), off))));
      a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(v + 8*g+8), wasm_i8x16_swizzle(xh, wasm_v128_or(wasm_i8x16_swizzle(cc, s2), off))));
      a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(v + 8*g+12), wasm_i8x16_swizzle(xh, wasm_v128_or(wasm_i8x16_swizzle(cc, s3), off))));
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(wasm_f32x4_add(a0, a1), wasm_f32x4_add(a2, a3)));
  }
}
/* E3: one byte per (lane, 2 kept of one group): 4*p0 | 64*p1; C3[O/4][G/4][16]: byte (gg*4 + r) for group 4q+gg */
EXPORT void nm_pair(const float* x, const float* V, const uint8_t* C3, const uint8_t* SP, float* y, int O, int K) {
  int G = K/4;
  const v128_t off = wasm_i8x16_const(0,1,2,3,0,1,2,3,0,1,2,3,0,1,2,3);
  const v128_t m12 = wasm_i8x16_splat(12);
  const v128_t s0 = wasm_v128_load(SP), s1 = wasm_v128_load(SP+16), s2 = wasm_v128_load(SP+32), s3 = wasm_v128_load(SP+48);
  for (int ob = 0; ob < O/4; ob++) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    const float* v = V + (long)ob*G*8; const uint8_t* c = C3 + (long)ob*G*4;
    for (int g = 0; g < G; g += 4) {
      v128_t cc = wasm_v128_load(c + 4*g);
      v128_t sp[4] = {s0, s1, s2, s3};
      for (int gg = 0; gg < 4; gg++) {
        v128_t xg = wasm_v128_load(x + 4*(g+gg));
        v128_t s = wasm_i8x16_swizzle(cc, sp[gg]);
        v128_t mk0 = wasm_v128_or(wasm_v128_and(s, m12), off);
        v128_t mk1 = wasm_v128_or(wasm_v128_and(wasm_u32x4_shr(s, 4), m12), off);
        v128_t p0 = wasm_f32x4_mul(wasm_v128_load(v + 8*(g+gg)), wasm_i8x16_swizzle(xg, mk0));
        v128_t p1 = wasm_f32x4_mul(wasm_v128_load(v + 8*(g+gg)+4), wasm_i8x16_swizzle(xg, mk1));
        if (gg & 1) { a2 = wasm_f32x4_add(a2, p0); a3 = wasm_f32x4_add(a3, p1); } else { a0 = wasm_f32x4_add(a0, p0); a1 = wasm_f32x4_add(a1, p1); }
      }
    }
    wasm_v128_store(y + 4*ob, wasm_f32x4_add(wasm_f32x4_add(a0, a1), wasm_f32x4_add(a2, a3)));
  }
}
