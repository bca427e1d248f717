/* Internal header of the sparsec standalone runtime (shared by sparsec_rt.c and the generated model.c). */
#ifndef SPARSEC_RT_H_
#define SPARSEC_RT_H_
#include "sparsec.h"

typedef struct { int32_t device_type, device_id; } rt_device;
typedef struct { uint8_t code, bits; uint16_t lanes; } rt_dtype;
typedef struct {               /* DLPack DLTensor */
  void *data;
  rt_device device;
  int32_t ndim;
  rt_dtype dtype;
  int64_t *shape;
  int64_t *strides;
  uint64_t byte_offset;
} rt_tensor;
typedef struct {               /* tvm-ffi TVMFFIAny */
  int32_t type_index;
  uint32_t zero_padding;
  union { int64_t v_int64; double v_float64; void *v_ptr; } v;
} rt_any;
enum { RT_FFI_NONE = 0, RT_FFI_INT = 1, RT_FFI_DLTENSOR_PTR = 7 };
typedef int (*rt_kernel)(void *self, const rt_any *args, int32_t num_args, rt_any *result);

typedef struct { uint64_t offset, nbytes; int32_t ndim, code, bits; int64_t shape[SPARSEC_MAX_DIMS]; } rt_param_desc;
typedef struct { const char *name; int32_t ndim, code, bits; int64_t shape[SPARSEC_MAX_DIMS]; int64_t lo, hi; } rt_io_desc;

/* defined by the generated model.c */
extern const int sparsec__n_params, sparsec__n_inputs, sparsec__n_outputs;
extern const rt_param_desc sparsec__params[];
extern const rt_io_desc sparsec__inputs[], sparsec__outputs[];
extern const uint64_t sparsec__params_bytes;
int sparsec__plan(rt_tensor *params, const sparsec_tensor *inputs, sparsec_tensor *outputs);

/* provided by sparsec_rt.c */
void *rt_alloc(uint64_t nbytes);       /* 64-byte aligned; freed at the end of the run */
int rt_call(rt_kernel f, const char *name, rt_any *args, int n);
int rt_fail(const char *msg, const char *detail);
void rt_copy(void *dst, const void *src, uint64_t n);
#endif
