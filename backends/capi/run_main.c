/* sparsec_run: the command-line driver of the standalone C API (what `sparsec run` executes under qemu-aarch64).
 *   sparsec_run PARAMS.bin OUT_DIR IN_0.spt [IN_1.spt ...]   -> OUT_DIR/out_<i>.spt
 * .spt tensor file: "SPT1", int32 dtype code, int32 bits, int32 ndim, int64 shape[ndim], raw little-endian data. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "sparsec.h"

static int read_spt(const char *path, sparsec_tensor *t) {
  FILE *f = fopen(path, "rb");
  char magic[4]; int32_t hdr[3];
  if (!f || fread(magic, 1, 4, f) != 4 || memcmp(magic, "SPT1", 4) || fread(hdr, 4, 3, f) != 3 || hdr[2] > SPARSEC_MAX_DIMS) {
    fprintf(stderr, "%s: not a .spt tensor file\n", path); if (f) fclose(f); return -1;
  }
  memset(t, 0, sizeof(*t));
  t->dtype_code = hdr[0]; t->dtype_bits = hdr[1]; t->ndim = hdr[2];
  size_t n = (size_t)(t->dtype_bits / 8);
  if (fread(t->shape, 8, (size_t)t->ndim, f) != (size_t)t->ndim) { fclose(f); return -1; }
  for (int i = 0; i < t->ndim; ++i) n *= (size_t)t->shape[i];
  t->data = malloc(n ? n : 1);
  if (fread(t->data, 1, n, f) != n) { fprintf(stderr, "%s: truncated\n", path); fclose(f); return -1; }
  fclose(f);
  return 0;
}

static int write_spt(const char *path, const sparsec_tensor *t) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  int32_t hdr[3] = {t->dtype_code, t->dtype_bits, t->ndim};
  size_t n = (size_t)(t->dtype_bits / 8);
  for (int i = 0; i < t->ndim; ++i) n *= (size_t)t->shape[i];
  fwrite("SPT1", 1, 4, f); fwrite(hdr, 4, 3, f); fwrite(t->shape, 8, (size_t)t->ndim, f); fwrite(t->data, 1, n, f);
  return fclose(f);
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s PARAMS.bin OUT_DIR INPUT.spt...\n", argv[0]); return 2; }
  int n_in = argc - 3, n_out = sparsec_num_outputs();
  if (n_in != sparsec_num_inputs()) { fprintf(stderr, "the model has %d inputs, got %d\n", sparsec_num_inputs(), n_in); return 2; }
  sparsec_model *m = sparsec_load(argv[1]);
  if (!m) { fprintf(stderr, "%s\n", sparsec_last_error()); return 3; }
  sparsec_tensor in[16], out[16];
  for (int i = 0; i < n_in; ++i) if (read_spt(argv[3 + i], &in[i])) return 2;
  int repeat = getenv("SPARSEC_REPEAT") ? atoi(getenv("SPARSEC_REPEAT")) : 1;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int r = 0; r < (repeat > 0 ? repeat : 1); ++r)
    if (sparsec_run(m, in, n_in, out, n_out) != 0) { fprintf(stderr, "%s\n", sparsec_last_error()); return 4; }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  for (int i = 0; i < n_out; ++i) {
    char p[4096];
    snprintf(p, sizeof p, "%s/out_%d.spt", argv[2], i);
    if (write_spt(p, &out[i])) { fprintf(stderr, "cannot write %s\n", p); return 5; }
  }
  fprintf(stderr, "sparsec_run: %d run(s), %.3f ms each\n", repeat, ((t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6) / (repeat > 0 ? repeat : 1));
  sparsec_free(m);
  return 0;
}
