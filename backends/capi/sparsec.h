/* sparsec standalone C API: run a model compiled by `sparsec compress --target aarch64|wasm` without Python or the
 * TVM runtime.  The library (libsparsec_model.so / model.wasm) holds the model's kernels (TVM-generated TIR, compiled
 * by LLVM for the target) and the call plan (which kernel runs on which buffers, buffer sizes as functions of the
 * input dims); the weights are read from params.bin (the kernels' packed layouts, written by the build).
 *
 *   sparsec_model *m = sparsec_load("lib/params.bin");           // NULL on error: sparsec_last_error()
 *   sparsec_tensor in = {ids, 2, SPARSEC_INT, 64, 0, {1, 16}};     // data, ndim, dtype code/bits, pad, shape
 *   sparsec_tensor out;
 *   if (sparsec_run(m, &in, 1, &out, 1) != 0) puts(sparsec_last_error());
 *   ... out.data (float32, out.shape[0..ndim)) is valid until the next sparsec_run or sparsec_free ...
 *   sparsec_free(m);
 */
#ifndef SPARSEC_H_
#define SPARSEC_H_
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

enum { SPARSEC_INT = 0, SPARSEC_UINT = 1, SPARSEC_FLOAT = 2 }; /* DLPack type codes */
#define SPARSEC_MAX_DIMS 8

typedef struct {
  void *data;
  int32_t ndim;
  int32_t dtype_code;
  int32_t dtype_bits;
  int32_t _pad;
  int64_t shape[SPARSEC_MAX_DIMS];
} sparsec_tensor;

typedef struct sparsec_model sparsec_model;

/* number and description of inputs / outputs (name, dtype; dims < 0 are dynamic) */
int sparsec_num_inputs(void);
int sparsec_num_outputs(void);
const char *sparsec_input_name(int i);
const char *sparsec_output_name(int i);

/* weights from a params.bin image in memory (not copied: keep it alive and 64-byte aligned) */
sparsec_model *sparsec_load_from_memory(const void *data, size_t nbytes);
#ifndef __wasm__
sparsec_model *sparsec_load(const char *params_path); /* reads the file */
#endif
int sparsec_run(sparsec_model *m, const sparsec_tensor *inputs, int n_inputs, sparsec_tensor *outputs, int n_outputs);
const char *sparsec_last_error(void);
void sparsec_free(sparsec_model *m);

#ifdef __cplusplus
}
#endif
#endif
