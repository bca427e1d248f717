// Times several wasm models side by side in ONE node process (same JIT, same machine state), interleaved rounds:
//   node bench/wasm_bench.js SPEC.json  ->  JSON on stdout
// SPEC: {"repeat": n, "rounds": r, "ort": {"threads": 1, "simd": true, "opt": "all"},
//        "cases": [{"name", "lib" (a sparsec wasm lib/) | "onnx" (run by onnxruntime-web, wasm backend),
//                   "inputs": [{"name"?, "dtype": "int64"|"float32", "shape": [...], "seed": s}]}]}
// onnxruntime-web is loaded from bench/web/node_modules (pinned in bench/web/package.json, installed by
// scripts/install.sh); its settings are reported in the output ("ort" key).
"use strict";
const fs = require("fs"), path = require("path");
const { SparsecModel } = require(path.join(__dirname, "..", "backends", "web", "model.js"));
function makeInput(spec) {
  const n = spec.shape.reduce((a, b) => a * b, 1);
  let s = spec.seed >>> 0 || 1;
  const rnd = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const data = spec.dtype === "int64" ? BigInt64Array.from({ length: n }, () => BigInt(Math.floor(rnd() * (spec.high || 256))))
    : Float32Array.from({ length: n }, () => rnd() * 2 - 1);
  return { data, shape: spec.shape, name: spec.name };
}
(async () => {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const models = [];
  let ort = null, ortInfo = null;
  for (const c of spec.cases) {
    const inputs = c.inputs.map(makeInput);
    if (c.onnx) {
      if (!ort) {
        ort = require(path.join(__dirname, "web", "node_modules", "onnxruntime-web"));
        const o = spec.ort || {};
        ort.env.wasm.numThreads = o.threads || 1;
        ort.env.wasm.proxy = false;
        ort.env.logLevel = "error";
        ortInfo = { version: ort.env.versions, numThreads: ort.env.wasm.numThreads, executionProviders: ["wasm"],
          graphOptimizationLevel: o.opt || "all", wasmBinary: "ort-wasm-simd-threaded.wasm (SIMD128)" };
      }
      const sess = await ort.InferenceSession.create(fs.readFileSync(c.onnx), { executionProviders: ["wasm"], graphOptimizationLevel: (spec.ort || {}).opt || "all" });
      const feeds = {};
      inputs.forEach((x, i) => { feeds[x.name || sess.inputNames[i]] = new ort.Tensor(x.data instanceof BigInt64Array ? "int64" : "float32", x.data, x.shape); });
      const run = async () => sess.run(feeds);
      models.push({ c, run, out: async () => { const r = await sess.run(feeds); return r[sess.outputNames[0]].data; }, times: [] });
    } else {
      const m = await SparsecModel.load({ wasm: fs.readFileSync(path.join(c.lib, "model.wasm")), params: fs.readFileSync(path.join(c.lib, "params.bin")) });
      models.push({ c, run: async () => m.run(inputs), out: async () => m.run(inputs)[0].data, times: [] });
    }
  }
  for (const x of models) for (let i = 0; i < 5; i++) await x.run(); // warm-up
  const rounds = spec.rounds || 7;
  for (let r = 0; r < rounds; r++) {        // interleaved rounds: drift hits every case alike
    for (const x of models) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < spec.repeat; i++) await x.run();
      x.times.push(Number(process.hrtime.bigint() - t0) / 1e6 / spec.repeat);
    }
  }
  const med = (a) => { const b = [...a].sort((p, q) => p - q); return b[b.length >> 1]; };
  const res = [];
  for (const x of models) {
    const o = spec.outputs ? Array.from(await x.out()) : undefined;
    res.push({ name: x.c.name, ms_median: med(x.times), ms_min: Math.min(...x.times), rounds, engine: x.c.onnx ? "onnxruntime-web" : "sparsec", output: o });
  }
  console.log(JSON.stringify({ cases: res, ort: ortInfo, node: process.version }));
})().catch((e) => { console.error(e.stack || e.message); process.exit(4); });
