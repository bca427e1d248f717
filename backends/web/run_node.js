// sparsec wasm runner for node (what `sparsec run` executes for a wasm artifact):
//   node run_node.js LIB_DIR OUT_DIR IN_0.spt [IN_1.spt ...]  -> OUT_DIR/out_<i>.spt   (SPARSEC_REPEAT=n times it)
"use strict";
const fs = require("fs"), path = require("path");
const { SparsecModel } = require(path.join(__dirname, "model.js"));
const TYPES = { "0:8": Int8Array, "0:32": Int32Array, "0:64": BigInt64Array, "1:8": Uint8Array, "2:32": Float32Array, "2:64": Float64Array };
function readSpt(p) {
  const b = fs.readFileSync(p);
  if (b.toString("latin1", 0, 4) !== "SPT1") throw new Error(p + ": not a .spt tensor");
  const code = b.readInt32LE(4), bits = b.readInt32LE(8), nd = b.readInt32LE(12);
  const shape = [...Array(nd).keys()].map((k) => Number(b.readBigInt64LE(16 + 8 * k)));
  const off = 16 + 8 * nd, raw = b.subarray(off);
  const copy = new Uint8Array(raw.length); copy.set(raw);
  return { shape, data: new TYPES[code + ":" + bits](copy.buffer) };
}
function writeSpt(p, t) {
  const [code, bits] = t.data instanceof Float32Array ? [2, 32] : t.data instanceof BigInt64Array ? [0, 64] : t.data instanceof Int32Array ? [0, 32] : [1, 8];
  const h = Buffer.alloc(16 + 8 * t.shape.length);
  h.write("SPT1", 0, "latin1"); h.writeInt32LE(code, 4); h.writeInt32LE(bits, 8); h.writeInt32LE(t.shape.length, 12);
  t.shape.forEach((s, k) => h.writeBigInt64LE(BigInt(s), 16 + 8 * k));
  fs.writeFileSync(p, Buffer.concat([h, Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength)]));
}
(async () => {
  const [lib, outDir, ...ins] = process.argv.slice(2);
  const m = await SparsecModel.load({ wasm: fs.readFileSync(path.join(lib, "model.wasm")), params: fs.readFileSync(path.join(lib, "params.bin")) });
  const inputs = ins.map(readSpt);
  const repeat = Math.max(1, parseInt(process.env.SPARSEC_REPEAT || "1", 10));
  let outs = m.run(inputs);  // warm-up (also the result when repeat = 1)
  const t0 = process.hrtime.bigint();
  for (let r = 0; r < repeat; r++) outs = m.run(inputs);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6 / repeat;
  outs.forEach((t, i) => writeSpt(path.join(outDir, "out_" + i + ".spt"), t));
  process.stderr.write("sparsec_run: " + repeat + " run(s), " + ms.toFixed(3) + " ms each\n");
})().catch((e) => { process.stderr.write(String(e && e.message ? e.message : e) + "\n"); process.exit(4); });
