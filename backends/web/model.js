/* sparsec wasm loader (node and browsers): loads model.wasm + params.bin built by
 *   sparsec compress model.onnx --target wasm -o out/
 * and runs the model.  Usage:
 *   node:    const { SparsecModel } = require("./model.js");
 *            const m = await SparsecModel.load({ wasm: fs.readFileSync("model.wasm"), params: fs.readFileSync("params.bin") });
 *   browser: <script src="model.js"></script>  const m = await SparsecModel.load({ wasm: "model.wasm", params: "params.bin" });
 *   const out = m.run([{ data: BigInt64Array.from([1n, 2n]), shape: [1, 2] }]);  // -> [{ data: Float32Array, shape }]
 * The tensors in the outputs are copies (valid after the next run). */
(function (root) {
  "use strict";
  const erf = (x) => { // Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7)
    const s = Math.sign(x); x = Math.abs(x);
    const t = 1 / (1 + 0.3275911 * x);
    const y = 1 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-x * x);
    return s * y;
  };
  const f = Math.fround;
  const MATH = {
    expf: (x) => f(Math.exp(x)), exp2f: (x) => f(Math.pow(2, x)), logf: (x) => f(Math.log(x)), log2f: (x) => f(Math.log2(x)),
    log10f: (x) => f(Math.log10(x)), powf: (a, b) => f(Math.pow(a, b)), sinf: (x) => f(Math.sin(x)), cosf: (x) => f(Math.cos(x)),
    tanf: (x) => f(Math.tan(x)), tanhf: (x) => f(Math.tanh(x)), sqrtf: (x) => f(Math.sqrt(x)), erff: (x) => f(erf(x)),
    fmodf: (a, b) => f(a % b), atan2f: (a, b) => f(Math.atan2(a, b)), atanf: (x) => f(Math.atan(x)), asinf: (x) => f(Math.asin(x)),
    acosf: (x) => f(Math.acos(x)), sinhf: (x) => f(Math.sinh(x)), coshf: (x) => f(Math.cosh(x)), roundf: (x) => f(Math.round(x)),
    exp: Math.exp, log: Math.log, pow: Math.pow, sin: Math.sin, cos: Math.cos, tanh: Math.tanh, sqrt: Math.sqrt, erf: erf,
    fmod: (a, b) => a % b,
  };
  const TYPES = { "0:8": Int8Array, "0:32": Int32Array, "0:64": BigInt64Array, "1:8": Uint8Array, "2:32": Float32Array, "2:64": Float64Array };
  function codeOf(arr) {
    if (arr instanceof Float32Array) return [2, 32]; if (arr instanceof Float64Array) return [2, 64];
    if (arr instanceof BigInt64Array) return [0, 64]; if (arr instanceof Int32Array) return [0, 32];
    if (arr instanceof Int8Array) return [0, 8]; if (arr instanceof Uint8Array) return [1, 8];
    throw new Error("unsupported input array type");
  }
  async function bytes(src) {
    if (typeof src === "string") { const r = await fetch(src); if (!r.ok) throw new Error(src + ": " + r.status); return new Uint8Array(await r.arrayBuffer()); }
    return src instanceof Uint8Array ? src : new Uint8Array(src.buffer ? src.buffer.slice(src.byteOffset, src.byteOffset + src.byteLength) : src);
  }
  class SparsecModel {
    static async load(opts) {
      const wasmBytes = await bytes(opts.wasm), params = await bytes(opts.params);
      let mem = null;
      const env = Object.assign({}, MATH);
      const { instance } = await WebAssembly.instantiate(wasmBytes, { env: new Proxy(env, {
        get: (t, k) => (k in t ? t[k] : () => { throw new Error("model.wasm imports unknown function " + String(k)); }),
      }) });
      const m = new SparsecModel(); m.ex = instance.exports;
      if (m.ex.sparsec_tensor_size() !== 88) throw new Error("model.wasm: unexpected tensor layout");
      const p = m.ex.sparsec_alloc(params.length);
      if (!p) throw new Error("out of wasm memory for the weights");
      new Uint8Array(m.ex.memory.buffer, p, params.length).set(params);
      m.model = m.ex.sparsec_load_from_memory(p, params.length);
      if (!m.model) throw new Error(m.lastError());
      m.nIn = m.ex.sparsec_num_inputs(); m.nOut = m.ex.sparsec_num_outputs();
      m.inputNames = [...Array(m.nIn).keys()].map((i) => m.str(m.ex.sparsec_input_name(i)));
      m.outputNames = [...Array(m.nOut).keys()].map((i) => m.str(m.ex.sparsec_output_name(i)));
      return m;
    }
    str(ptr) { const b = new Uint8Array(this.ex.memory.buffer); let e = ptr; while (b[e]) e++; return new TextDecoder().decode(b.subarray(ptr, e)); }
    lastError() { return this.str(this.ex.sparsec_last_error()); }
    /* inputs: array (model order) or {name: {data, shape}}; returns array of {name, data, shape} */
    run(inputs) {
      const ex = this.ex;
      if (!Array.isArray(inputs)) inputs = this.inputNames.map((n) => { if (!(n in inputs)) throw new Error("missing input " + n); return inputs[n]; });
      if (inputs.length !== this.nIn) throw new Error("the model has " + this.nIn + " inputs");
      ex.sparsec_reset();
      const T = 88, tin = ex.sparsec_alloc(T * this.nIn), tout = ex.sparsec_alloc(T * this.nOut);
      inputs.forEach((x, i) => {
        const [code, bits] = codeOf(x.data);
        const d = ex.sparsec_alloc(x.data.byteLength);
        if (!d || !tin) throw new Error("out of wasm memory");
        new Uint8Array(ex.memory.buffer, d, x.data.byteLength).set(new Uint8Array(x.data.buffer, x.data.byteOffset, x.data.byteLength));
        const dv = new DataView(ex.memory.buffer, tin + T * i, T);
        dv.setUint32(0, d, true); dv.setInt32(4, x.shape.length, true); dv.setInt32(8, code, true); dv.setInt32(12, bits, true);
        x.shape.forEach((s, k) => dv.setBigInt64(24 + 8 * k, BigInt(s), true));
      });
      if (ex.sparsec_run(this.model, tin, this.nIn, tout, this.nOut) !== 0) throw new Error(this.lastError());
      const outs = [];
      for (let i = 0; i < this.nOut; i++) {
        const dv = new DataView(ex.memory.buffer, tout + T * i, T);
        const ptr = dv.getUint32(0, true), nd = dv.getInt32(4, true), code = dv.getInt32(8, true), bits = dv.getInt32(12, true);
        const shape = [...Array(nd).keys()].map((k) => Number(dv.getBigInt64(24 + 8 * k, true)));
        const Ty = TYPES[code + ":" + bits], n = shape.reduce((a, b) => a * b, 1);
        outs.push({ name: this.outputNames[i], shape, data: new Ty(ex.memory.buffer.slice(ptr, ptr + n * bits / 8)) });
      }
      return outs;
    }
  }
  root.SparsecModel = SparsecModel;
  if (typeof module !== "undefined" && module.exports) module.exports = { SparsecModel };
})(typeof globalThis !== "undefined" ? globalThis : this);
