/* sparsec standalone runtime: what TVM-compiled kernels need from a runtime (workspace allocation, the parallel
 * launcher, error reporting) plus the public API of sparsec.h.  Freestanding on wasm32 (no libc: a bump allocator
 * over the wasm memory, math functions imported from JavaScript), libc on Linux. */
#include "sparsec_rt.h"

#ifdef __wasm__
#define RT_EXPORT __attribute__((visibility("default"), used))
extern unsigned char __heap_base;
static uintptr_t heap_top = 0, heap_end = 0;
static void *rt_sys_alloc(uint64_t n) {
  if (!heap_top) { heap_top = (uintptr_t)&__heap_base; heap_end = __builtin_wasm_memory_size(0) * 65536u; }
  uintptr_t p = (heap_top + 63) & ~(uintptr_t)63;
  uintptr_t e = p + (uintptr_t)n;
  if (e < p) return 0;
  if (e > heap_end) {
    uintptr_t pages = (e - heap_end + 65535) / 65536;
    if (__builtin_wasm_memory_grow(0, pages) == (uintptr_t)-1) return 0;
    heap_end += pages * 65536;
  }
  heap_top = e;
  return (void *)p;
}
/* Memory after the model is loaded is a stack reset by the JS loader (sparsec_reset) before it writes the inputs
 * of a run: inputs, intermediate buffers, workspaces and outputs of one run live until the next reset. */
static uintptr_t run_mark = 0;
static void rt_run_begin(void) {}
static void rt_run_end(void) {}
static void rt_sys_free(void *p) { (void)p; }
static void rt_release(void) {}
RT_EXPORT void sparsec_reset(void) { if (run_mark) heap_top = run_mark; }
void *memcpy(void *d, const void *s, size_t n) { unsigned char *a = d; const unsigned char *b = s; while (n--) *a++ = *b++; return d; }
void *memset(void *d, int c, size_t n) { unsigned char *a = d; while (n--) *a++ = (unsigned char)c; return d; }
void *memmove(void *d, const void *s, size_t n) {
  unsigned char *a = d; const unsigned char *b = s;
  if (a < b) { while (n--) *a++ = *b++; } else { a += n; b += n; while (n--) *--a = *--b; }
  return d;
}
/* exported for the JS loader: permanent allocations (the params image), before any run */
RT_EXPORT void *sparsec_alloc(uint32_t n) { return rt_sys_alloc(n); }
RT_EXPORT int sparsec_tensor_size(void) { return (int)sizeof(sparsec_tensor); }
#else
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define RT_EXPORT __attribute__((visibility("default")))
#define RT_MAX_LIVE 4096
static void *live[RT_MAX_LIVE];
static int n_live = 0;
static void *rt_sys_alloc(uint64_t n) {
  void *p = NULL;
  if (posix_memalign(&p, 64, n ? (size_t)n : 64) != 0) return NULL;
  return p;
}
static void rt_sys_free(void *p) { free(p); }
static void rt_release(void) { while (n_live) free(live[--n_live]); }
static void rt_run_begin(void) {}
static void rt_run_end(void) {}
#endif

static char last_error[512];
static void set_error(const char *a, const char *b) {
  size_t i = 0;
  for (; a && *a && i < sizeof(last_error) - 1; ++a) last_error[i++] = *a;
  for (; b && *b && i < sizeof(last_error) - 1; ++b) last_error[i++] = *b;
  last_error[i] = 0;
}
RT_EXPORT const char *sparsec_last_error(void) { return last_error; }
int rt_fail(const char *msg, const char *detail) { set_error(msg, detail); return -1; }
void rt_copy(void *dst, const void *src, uint64_t n) { memcpy(dst, src, (size_t)n); }

void *rt_alloc(uint64_t nbytes) {
  void *p = rt_sys_alloc(nbytes);
#ifndef __wasm__
  if (p && n_live < RT_MAX_LIVE) live[n_live++] = p;
  else if (p) { free(p); p = NULL; }
#endif
  return p;
}

/* ---- what TVM's generated code calls (function pointers the TVM runtime would install) --------------------- */
typedef struct { void *sync_handle; int32_t num_task; } rt_parallel_env;
typedef int (*rt_parallel_lambda)(int task_id, rt_parallel_env *penv, void *cdata);
static void *ws_alloc(int dev_type, int dev_id, uint64_t n, int code, int bits) {
  (void)dev_type; (void)dev_id; (void)code; (void)bits;
  return rt_sys_alloc(n);
}
static int ws_free(int dev_type, int dev_id, void *p) { (void)dev_type; (void)dev_id; rt_sys_free(p); return 0; }
/* one task on the calling thread: the kernels split their parallel loops by num_task, so 1 task runs them whole */
static int parallel_launch(rt_parallel_lambda f, void *cdata, int num_task) {
  (void)num_task;
  rt_parallel_env env = {0, 1};
  return f(0, &env, cdata);
}
void *__TVMBackendAllocWorkspace = (void *)&ws_alloc;
void *__TVMBackendFreeWorkspace = (void *)&ws_free;
void *__TVMBackendParallelLaunch = (void *)&parallel_launch;
void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t n) {
  size_t i = 0;
  for (const char *c = kind; c && *c && i < sizeof(last_error) - 3; ++c) last_error[i++] = *c;
  last_error[i++] = ':'; last_error[i++] = ' ';
  for (int32_t k = 0; k < n; ++k)
    for (const char *c = parts[k]; c && *c && i < sizeof(last_error) - 1; ++c) last_error[i++] = *c;
  last_error[i] = 0;
}
int rt_call(rt_kernel f, const char *name, rt_any *args, int n) {
  rt_any res;
  res.type_index = RT_FFI_NONE; res.zero_padding = 0; res.v.v_int64 = 0;
  if (f(0, args, n, &res) != 0) {
    char buf[480]; size_t i = 0;
    for (const char *c = name; *c && i < 100; ++c) buf[i++] = *c;
    buf[i++] = ':'; buf[i++] = ' ';
    for (const char *c = last_error; *c && i < sizeof(buf) - 1; ++c) buf[i++] = *c;
    buf[i] = 0;
    set_error("kernel ", buf);
    return -1;
  }
  return 0;
}

/* ---- public API ------------------------------------------------------------------------------------------ */
struct sparsec_model { rt_tensor *params; int64_t *shapes; void *owned; };

RT_EXPORT int sparsec_num_inputs(void) { return sparsec__n_inputs; }
RT_EXPORT int sparsec_num_outputs(void) { return sparsec__n_outputs; }
RT_EXPORT const char *sparsec_input_name(int i) { return i >= 0 && i < sparsec__n_inputs ? sparsec__inputs[i].name : 0; }
RT_EXPORT const char *sparsec_output_name(int i) { return i >= 0 && i < sparsec__n_outputs ? sparsec__outputs[i].name : 0; }

static const char MAGIC[8] = {'S', 'P', 'A', 'R', 'S', 'E', 'C', 'P'};
RT_EXPORT sparsec_model *sparsec_load_from_memory(const void *data, size_t nbytes) {
  const unsigned char *b = (const unsigned char *)data;
  if (!b || nbytes < 64) { rt_fail("params image is too small", 0); return 0; }
  for (int i = 0; i < 8; ++i) if (b[i] != (unsigned char)MAGIC[i]) { rt_fail("not a sparsec params.bin (bad magic)", 0); return 0; }
  uint64_t total = 0;
  for (int i = 0; i < 8; ++i) total |= (uint64_t)b[8 + i] << (8 * i);
  if (total != sparsec__params_bytes || nbytes < 64 + total) { rt_fail("params.bin does not belong to this library (size mismatch)", 0); return 0; }
  if (((uintptr_t)b) & 63) { rt_fail("params image must be 64-byte aligned", 0); return 0; }
  sparsec_model *m = (sparsec_model *)rt_sys_alloc(sizeof(sparsec_model));
  int np = sparsec__n_params;
  m->params = (rt_tensor *)rt_sys_alloc(sizeof(rt_tensor) * (np ? np : 1));
  m->shapes = (int64_t *)rt_sys_alloc(sizeof(int64_t) * SPARSEC_MAX_DIMS * (np ? np : 1));
  m->owned = 0;
  for (int i = 0; i < np; ++i) {
    const rt_param_desc *d = &sparsec__params[i];
    rt_tensor *t = &m->params[i];
    t->data = (void *)(b + 64 + d->offset);
    t->device.device_type = 1; t->device.device_id = 0;
    t->ndim = d->ndim;
    t->dtype.code = (uint8_t)d->code; t->dtype.bits = (uint8_t)d->bits; t->dtype.lanes = 1;
    t->shape = m->shapes + SPARSEC_MAX_DIMS * i;
    for (int k = 0; k < d->ndim; ++k) t->shape[k] = d->shape[k];
    t->strides = 0; t->byte_offset = 0;
  }
#ifdef __wasm__
  run_mark = heap_top;
#endif
  return m;
}

#ifndef __wasm__
RT_EXPORT sparsec_model *sparsec_load(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) { rt_fail("cannot open ", path); return 0; }
  fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  void *buf = n > 0 ? rt_sys_alloc((uint64_t)n) : 0;
  if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) { fclose(f); free(buf); rt_fail("cannot read ", path); return 0; }
  fclose(f);
  sparsec_model *m = sparsec_load_from_memory(buf, (size_t)n);
  if (!m) { free(buf); return 0; }
  m->owned = buf;
  return m;
}
#endif

RT_EXPORT void sparsec_free(sparsec_model *m) {
  if (!m) return;
  rt_release();
#ifndef __wasm__
  free(m->owned); free(m->params); free(m->shapes); free(m);
#endif
}

RT_EXPORT int sparsec_run(sparsec_model *m, const sparsec_tensor *inputs, int n_inputs, sparsec_tensor *outputs, int n_outputs) {
  if (!m) return rt_fail("no model", 0);
  if (n_inputs != sparsec__n_inputs) return rt_fail("wrong number of inputs", 0);
  if (n_outputs != sparsec__n_outputs) return rt_fail("wrong number of outputs", 0);
  rt_release(); /* the previous run's buffers (and outputs) */
  rt_run_begin();
  last_error[0] = 0;
  int rc = sparsec__plan(m->params, inputs, outputs);
  rt_run_end();
  return rc;
}
