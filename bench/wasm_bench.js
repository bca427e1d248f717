// Times several sparsec wasm libraries side by side in ONE node process (same JIT, same machine state):
//   node bench/wasm_bench.js SPEC.json  ->  JSON on stdout
// SPEC: {"repeat": n, "cases": [{"name", "lib", "inputs": [{"dtype": "int64"|"float32", "shape": [...], "seed": s}]}]}
"use strict";
const fs = require("fs"), path = require("path");
const { SparsecModel } = require(path.join(__dirname, "..", "backends", "web", "model.js"));
function makeInput(spec) {
  const n = spec.shape.reduce((a, b) => a * b, 1);
  let s = spec.seed >>> 0 || 1;
  const rnd = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const data = spec.dtype === "int64" ? BigInt64Array.from({ length: n }, () => BigInt(Math.floor(rnd() * (spec.high || 256))))
    : Float32Array.from({ length: n }, () => rnd() * 2 - 1);
  return { data, shape: spec.shape };
}
(async () => {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const models = [];
  for (const c of spec.cases) {
    const m = await SparsecModel.load({ wasm: fs.readFileSync(path.join(c.lib, "model.wasm")), params: fs.readFileSync(path.join(c.lib, "params.bin")) });
    models.push({ c, m, inputs: c.inputs.map(makeInput), times: [] });
  }
  for (const x of models) for (let i = 0; i < 3; i++) x.m.run(x.inputs); // warm-up
  const rounds = spec.rounds || 7;
  for (let r = 0; r < rounds; r++) {        // interleaved rounds: drift hits every case alike
    for (const x of models) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < spec.repeat; i++) x.m.run(x.inputs);
      x.times.push(Number(process.hrtime.bigint() - t0) / 1e6 / spec.repeat);
    }
  }
  const med = (a) => { const b = [...a].sort((p, q) => p - q); return b[b.length >> 1]; };
  console.log(JSON.stringify(models.map((x) => ({ name: x.c.name, ms_median: med(x.times), ms_min: Math.min(...x.times), rounds }))));
})().catch((e) => { console.error(e.message); process.exit(4); });
