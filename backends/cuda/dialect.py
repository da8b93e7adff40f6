"""The kernel dialect: one kernel source, compiled as CUDA C++ (NVRTC) or as OpenCL C (PoCL, Oclgrind).

Kernel sources in `kernels.py` are written against the macros below and never
name a CUDA or OpenCL keyword themselves:

    KERNEL            entry point                  __global__ (extern "C") | __kernel
    GLOBAL            global-memory pointer        (nothing)               | __global
    SHARED            group-shared array           __shared__              | __local
    SHARED_PTR        pointer to group memory      (nothing)               | __local
    DEVICE            helper function              __device__ inline       | static inline
    LOCAL_ID          thread in the group (int)    threadIdx.x             | get_local_id(0)
    LOCAL_SIZE        threads in the group         blockDim.x              | get_local_size(0)
    GROUP_ID, GROUP_ID_Y                           blockIdx.x / .y         | get_group_id(0 / 1)
    BARRIER()         group barrier                __syncthreads()         | barrier(CLK_LOCAL_MEM_FENCE)
    LOAD_F16(p, off)  f16 at byte offset of a      PTX cvt.f32.f16         | vload_half
                      uchar pointer, as float
    LOAD_F32x4(p)     four floats (16-B aligned)   float4 load             | vload4
    FMUL / FADD / FSUB  products and sums that must not be fused into an FMA (exact dequantization)
    WARP_SUM, WARP_MAX, WARP_ARGMAX
                      butterfly reduction over 32 lanes: __shfl_xor_sync on CUDA; on OpenCL the same
                      butterfly through group memory with a barrier per step, so every lane adds the
                      same operands in the same order and the results are bit-identical in form.

Rules the sources follow so that both readings mean the same thing:
- a group is a whole number of 32-lane warps, at most MAX_GROUP threads;
- warp and block reductions are reached by every thread of the group (uniform control flow), since
  the OpenCL emulation holds group barriers; threads with nothing to add contribute 0 (or -inf);
- the `scratch` argument of a reduction is a SHARED float array of REDUCE_SCRATCH floats (32 on
  CUDA, MAX_GROUP on OpenCL, where the warp butterfly needs one slot per thread).

What only CUDA executes, and so is checked by compilation alone: the shuffle instructions and their
full-warp masks, the PTX half conversion, float4 alignment and everything about speed.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_GROUP = 256  # threads per group: every launch in ops.py stays at or under it

_CUDA = r"""
#define KERNEL extern "C" __global__ void
#define GLOBAL
#define SHARED __shared__
#define SHARED_PTR
#define DEVICE static __device__ __forceinline__
#define RESTRICT __restrict__
#define LOCAL_ID ((int)threadIdx.x)
#define LOCAL_SIZE ((int)blockDim.x)
#define GROUP_ID ((int)blockIdx.x)
#define GROUP_ID_Y ((int)blockIdx.y)
#define BARRIER() __syncthreads()
#define EXP(x) expf(x)
#define LOG(x) logf(x)
#define SQRT(x) sqrtf(x)
#define FMAX(a, b) fmaxf(a, b)
#define INF_F __int_as_float(0x7f800000)
#define FMUL(a, b) __fmul_rn(a, b)
#define FADD(a, b) __fadd_rn(a, b)
#define FSUB(a, b) __fsub_rn(a, b)
#define LOAD_F32x4(p) (*(const float4*)(p))
#define REDUCE_SCRATCH 32
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef long long i64;

DEVICE float half_bits_to_float(ushort h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

DEVICE float warp_sum_(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

DEVICE float warp_max_(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* (value, index) pairs: the larger value wins, ties go to the lower index. */
DEVICE void warp_argmax_(float* v, int* i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        int oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (ov > *v || (ov == *v && oi < *i)) { *v = ov; *i = oi; }
    }
}
#define WARP_SUM(v, scratch) warp_sum_(v)
#define WARP_MAX(v, scratch) warp_max_(v)
#define WARP_ARGMAX(v, i, sv, si) warp_argmax_(v, i)
"""

_OPENCL = r"""
#pragma OPENCL FP_CONTRACT OFF
#define KERNEL __kernel void
#define GLOBAL __global
#define SHARED __local
#define SHARED_PTR __local
#define DEVICE static inline
#define RESTRICT restrict
#define LOCAL_ID ((int)get_local_id(0))
#define LOCAL_SIZE ((int)get_local_size(0))
#define GROUP_ID ((int)get_group_id(0))
#define GROUP_ID_Y ((int)get_group_id(1))
#define BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#define EXP(x) exp(x)
#define LOG(x) log(x)
#define SQRT(x) sqrt(x)
#define FMAX(a, b) fmax(a, b)
#define INF_F INFINITY
#define FMUL(a, b) ((a) * (b))
#define FADD(a, b) ((a) + (b))
#define FSUB(a, b) ((a) - (b))
#define LOAD_F32x4(p) vload4(0, p)
#define REDUCE_SCRATCH MAX_GROUP
typedef long i64;

DEVICE float half_bits_to_float(ushort h) {
    return vload_half(0, (const __private half*)&h);
}

/* The CUDA butterfly, lane i taking lane (i ^ o)'s value, through group memory. */
DEVICE float warp_sum_(float v, __local float* s) {
    int l = LOCAL_ID;
    for (int o = 16; o > 0; o >>= 1) {
        s[l] = v;
        BARRIER();
        v += s[l ^ o];
        BARRIER();
    }
    return v;
}

DEVICE float warp_max_(float v, __local float* s) {
    int l = LOCAL_ID;
    for (int o = 16; o > 0; o >>= 1) {
        s[l] = v;
        BARRIER();
        v = fmax(v, s[l ^ o]);
        BARRIER();
    }
    return v;
}

DEVICE void warp_argmax_(float* v, int* i, __local float* sv, __local int* si) {
    int l = LOCAL_ID;
    for (int o = 16; o > 0; o >>= 1) {
        sv[l] = *v;
        si[l] = *i;
        BARRIER();
        float ov = sv[l ^ o];
        int oi = si[l ^ o];
        BARRIER();
        if (ov > *v || (ov == *v && oi < *i)) { *v = ov; *i = oi; }
    }
}
#define WARP_SUM(v, scratch) warp_sum_(v, scratch)
#define WARP_MAX(v, scratch) warp_max_(v, scratch)
#define WARP_ARGMAX(v, i, sv, si) warp_argmax_(v, i, sv, si)
"""

# Written once for both targets, on top of the warp reductions above.
_COMMON = r"""
#define LOAD_F16(p, off) half_bits_to_float((ushort)((p)[off] | ((p)[(off) + 1] << 8)))

/* Sum over the whole group; every thread gets the same value. */
DEVICE float block_sum(float v, SHARED_PTR float* scratch) {
    int lane = LOCAL_ID & 31, warp = LOCAL_ID >> 5, n_warps = LOCAL_SIZE >> 5;
    v = WARP_SUM(v, scratch);
    BARRIER();
    if (lane == 0) scratch[warp] = v;
    BARRIER();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    BARRIER();
    return WARP_SUM(v, scratch);
}

DEVICE float block_max(float v, SHARED_PTR float* scratch) {
    int lane = LOCAL_ID & 31, warp = LOCAL_ID >> 5, n_warps = LOCAL_SIZE >> 5;
    v = WARP_MAX(v, scratch);
    BARRIER();
    if (lane == 0) scratch[warp] = v;
    BARRIER();
    v = lane < n_warps ? scratch[lane] : -INF_F;
    BARRIER();
    return WARP_MAX(v, scratch);
}

DEVICE void block_argmax(float* v, int* i, SHARED_PTR float* sv, SHARED_PTR int* si) {
    int lane = LOCAL_ID & 31, warp = LOCAL_ID >> 5, n_warps = LOCAL_SIZE >> 5;
    WARP_ARGMAX(v, i, sv, si);
    BARRIER();
    if (lane == 0) { sv[warp] = *v; si[warp] = *i; }
    BARRIER();
    *v = lane < n_warps ? sv[lane] : -INF_F;
    *i = lane < n_warps ? si[lane] : 0x7fffffff;
    BARRIER();
    WARP_ARGMAX(v, i, sv, si);
}
"""

TARGETS = ("cuda", "opencl")


def render(source: str, target: str, defines: Mapping[str, object] | None = None) -> str:
    """The full translation unit of `source` for `target`: defines, dialect prelude, source."""
    if target not in TARGETS:
        raise ValueError(f"unknown kernel target {target!r} (known: {', '.join(TARGETS)})")
    lines = [f"#define MAX_GROUP {MAX_GROUP}"]
    lines += [f"#define {name} {value}" for name, value in (defines or {}).items()]
    prelude = _CUDA if target == "cuda" else _OPENCL
    return "\n".join(lines) + "\n" + prelude + _COMMON + "\n#line 1\n" + source
