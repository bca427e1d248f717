// Times the GEMV variants of variants.c (one node process, 9 interleaved rounds, median) on a random 2:4 weight:
//   node variants.js variants.wasm OUT IN  -> JSON {variant: {ms_median, max_abs_err}} (errors vs a float64 reference)
"use strict";
const fs = require("fs");
(async () => {
  const { instance } = await WebAssembly.instantiate(fs.readFileSync(process.argv[2]), {});
  const e = instance.exports; const mem = () => e.memory.buffer;
  const O = +process.argv[3], K = +process.argv[4], G = K / 4;
  const f32 = (n) => { const p = e.balloc(4 * n); return [p, new Float32Array(mem(), p, n)]; };
  const u8 = (n) => { const p = e.balloc(n); return [p, new Uint8Array(mem(), p, n)]; };
  const rnd = () => Math.random() * 2 - 1;
  const [px, x] = f32(K); for (let i = 0; i < K; i++) x[i] = rnd();
  // 2:4 weights: pos[o][g][t], val[o][g][t]
  const pos = [], val = [];
  for (let o = 0; o < O; o++) { const P = [], Vv = []; for (let g = 0; g < G; g++) { let a = Math.floor(Math.random()*4), b; do b = Math.floor(Math.random()*4); while (b === a); if (a > b) [a, b] = [b, a]; P.push([a, b]); Vv.push([rnd(), rnd()]); } pos.push(P); val.push(Vv); }
  const ref = new Float64Array(O); for (let o = 0; o < O; o++) { let s = 0; for (let g = 0; g < G; g++) for (let t = 0; t < 2; t++) s += val[o][g][t] * x[4*g + pos[o][g][t]]; ref[o] = s; }
  const [pW, W] = f32(O * K); for (let o = 0; o < O; o++) for (let g = 0; g < G; g++) for (let t = 0; t < 2; t++) W[((o>>2)*K + 4*g + pos[o][g][t])*4 + (o&3)] = val[o][g][t];
  const [pV, V] = f32(O * K / 2); for (let o = 0; o < O; o++) for (let g = 0; g < G; g++) for (let t = 0; t < 2; t++) V[(o>>2)*G*8 + g*8 + t*4 + (o&3)] = val[o][g][t];
  const [pM, M] = u8(O / 4 * G * 32); for (let o = 0; o < O; o++) for (let g = 0; g < G; g++) for (let t = 0; t < 2; t++) for (let k = 0; k < 4; k++) M[(o>>2)*G*32 + g*32 + t*16 + (o&3)*4 + k] = 4*pos[o][g][t] + k;
  const [pC, C] = u8(O / 4 * G * 8); for (let o = 0; o < O; o++) for (let g = 0; g < G; g++) for (let t = 0; t < 2; t++) C[(o>>2)*G*8 + (g>>1)*16 + (g&1)*8 + t*4 + (o&3)] = 4*pos[o][g][t];
  const [pI, I] = u8(O / 4 * G * 2); for (let o = 0; o < O; o++) for (let g = 0; g < G; g++) for (let t = 0; t < 2; t++) I[(o>>2)*G*2 + g*2 + t] |= pos[o][g][t] << (2*(o&3));
  const [pT, TB] = u8(256 * 16); for (let c = 0; c < 256; c++) for (let r = 0; r < 4; r++) for (let k = 0; k < 4; k++) TB[c*16 + r*4 + k] = 4*((c >> (2*r)) & 3) + k;
  const [pC3, C3] = u8(O / 4 * G * 4); for (let o = 0; o < O; o++) for (let g = 0; g < G; g++) C3[(o>>2)*G*4 + (g>>2)*16 + (g&3)*4 + (o&3)] = 4*pos[o][g][0] + 64*pos[o][g][1];
  const [pSP, SP] = u8(64); for (let i = 0; i < 64; i++) SP[i] = i >> 2;
  const [py, y] = f32(O);
  const runs = { dense: () => e.dense4(px, pW, py, O, K), dense2: () => e.dense(px, pW, py, O, K), mem: () => e.nm_spread_mem(px, pV, pC, pSP, py, O, K), pair: () => e.nm_pair(px, pV, pC3, pSP, py, O, K), masks: () => e.nm_masks(px, pV, pM, py, O, K), spread: () => e.nm_spread(px, pV, pC, py, O, K), shuf: () => e.nm_spread_shuf(px, pV, pC, py, O, K), table: () => e.nm_table(px, pV, pI, pT, py, O, K) };
  const errs = {};
  for (const [n, f] of Object.entries(runs)) { y.fill(0); f(); let err = 0; for (let o = 0; o < O; o++) err = Math.max(err, Math.abs(y[o] - ref[o])); errs[n] = err; }
  const times = {}; for (const n in runs) times[n] = [];
  const reps = Math.max(10, Math.floor(2e8 / (O * K)));
  for (let r = 0; r < 9; r++) for (const [n, f] of Object.entries(runs)) { for (let i = 0; i < 3; i++) f(); const t0 = process.hrtime.bigint(); for (let i = 0; i < reps; i++) f(); times[n].push(Number(process.hrtime.bigint() - t0) / 1e6 / reps); }
  const med = (a) => a.sort((p, q) => p - q)[a.length >> 1];
  const out = {}; for (const n in times) out[n] = { ms_median: med(times[n]), max_abs_err: errs[n] };
  console.log(JSON.stringify(out));
})();
