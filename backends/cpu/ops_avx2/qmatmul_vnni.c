/* The x8 kernels (x8_kernels.h) compiled for AVX512-VNNI + VL: vpdpbusd takes u8 x s8 products
 * summed by 4 into int32 in one instruction where AVX2 needs maddubs, adds in s16 and a madd.
 * Called by qmatmul.c only when the CPU has it (ops_cpu_has_vnni). */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")

#include <immintrin.h>

#include "ops_avx2.h"
#include "simd.h"
#define X8_VNNI 1
#include "x8_kernels.h"

void ops_x8_rows_vnni(int qtype, const uint8_t *data, int64_t r0, int64_t nr, int64_t nb, const QAct *a, float *o,
                      int64_t ldo)
{
    x8_rows(qtype, data, r0, nr, nb, a, o, ldo);
}

#endif /* x86-64 */
