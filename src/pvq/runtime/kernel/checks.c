/* What native.py checks when it loads the library (its ABI version and struct sizes against Python's) and
 * Decoder before it uses a matrix (the codes' range), and the kernels' thread count. */
#include "pvq.h"

int64_t pvq_abi_version(void) { return PVQ_ABI_VERSION; }

/* sizeof the struct native.STRUCTS names by its index `which`, -1 for none */
int64_t pvq_struct_size(int64_t which) {
    switch (which) {
        case STRUCT_MATRIX: return (int64_t)sizeof(pvq_matrix_t);
        case STRUCT_ROTATION: return (int64_t)sizeof(pvq_rotation_t);
        case STRUCT_LINEAR: return (int64_t)sizeof(pvq_linear_t);
        default: return -1;
    }
}

/* The first group of PVQ matrix w whose shape index (code / L) is not below V, or -1: a code out of range
 * would send the decoders outside their tables, so Decoder checks every code once before using them. */
int64_t pvq_check_codes(const pvq_matrix_t *w, uint64_t V) {
    const stream_t st = matrix_stream(w);
    const int64_t groups = w->rows * w->cols / w->n;
    for (int64_t g = 0; g < groups; g++) {
        uint64_t lvl;
        if (code_at(&st, g, &lvl) >= V) return g;
    }
    return -1;
}

/* OpenMP threads of the kernels called from this thread from now on (torch.set_num_threads does not
 * reach them; OMP_NUM_THREADS reaches both) */
#ifdef _OPENMP
#include <omp.h>
void pvq_set_threads(int n) { omp_set_num_threads(n); }
#else
void pvq_set_threads(int n) { (void)n; }
#endif
