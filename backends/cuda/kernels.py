"""Kernel sources (in the dialect of `dialect.py`) and the programs built from them.

Two sources:

- `QUANT_SOURCE`, compiled once per weight type (`-D QTYPE_<NAME>`): the type's block decoder
  `dequant_part`, a fused dequantize-matvec for decode (`matvec1_*`, one token per group; `matvec8_*`,
  up to eight tokens per group sharing each decoded weight) and a row dequantizer (`dequant_*`) for
  embedding lookups and for prefill through a dense GEMM.
- `OPS_SOURCE`: RMSNorm, RoPE, SiLU-and-multiply, paged causal attention and top-k / greedy selection.

Block layouts are those of `backends/quants.py` (the numpy oracle), whose diagrams are the
reference; `dequant_part` reproduces its arithmetic product for product (FMUL/FSUB are never fused
into an FMA), so `dequant_*` is bit-identical to it.

Every type is cut into parts of 8 weights: two runs of 4 consecutive weights at offsets o0 and o1
inside the block. A warp (32 lanes) owns one output row and walks its parts lane by lane, so lane L
sums parts L, L+32, L+64, ... and the warp butterfly adds the 32 partial sums. That order depends on
neither the number of tokens in the launch nor the variant, which keeps a token's result
independent of what else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T

from backends.quants import QUANT_TYPES

# --- weight types on the device ---------------------------------------------------------------
# (weights per block, bytes per block) as the kernels see them. F16 and F32 are read in "blocks"
# of 8 weights so that they share the 8-weight parts of the quantized types.


@dataclass(frozen=True)
class DeviceType:
    qtype: T
    block_size: int  # weights per block as the kernel walks them
    type_size: int  # bytes per such block
    parts: int  # 8-weight parts per block

    @property
    def name(self) -> str:
        return self.qtype.name.lower()

    def row_bytes(self, n_cols: int) -> int:
        return n_cols // self.block_size * self.type_size


# The block types with kernels here. Their geometry is backends/quants.py's table, handed to
# each program as QK (weights per block) and QTS (bytes per block); float rows are walked in
# blocks of 8 weights.
DEVICE_TYPES: dict[T, DeviceType] = {
    t: DeviceType(t, block, size, block // 8)
    for t, block, size in [(q, QUANT_TYPES[q].block_size, QUANT_TYPES[q].type_size)
                           for q in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)]
                          + [(T.F16, 8, 16), (T.F32, 8, 32)]
}

QUANT_SOURCE = r"""
/* dequant_part(b, part, w, &o0, &o1): the 8 weights of one part of the block at b, w[0..3] at
   block offsets o0..o0+3 and w[4..7] at o1..o1+3. The arithmetic is quants.py's, unfused. */

#if defined(QTYPE_Q4_0)
/* Q4_0: d f16 | qs[16]; qs[j] = [w(j+16) : 4 | w(j) : 4];  w = d * (q - 8).  4 parts: bytes 4p..4p+3. */
#define QNAME q4_0
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 0);
    for (int i = 0; i < 4; ++i) {
        int q = b[2 + 4 * p + i];
        w[i] = FMUL((float)((q & 15) - 8), d);
        w[4 + i] = FMUL((float)((q >> 4) - 8), d);
    }
    *o0 = 4 * p;
    *o1 = 16 + 4 * p;
}

#elif defined(QTYPE_Q4_1)
/* Q4_1: d f16 | m f16 | qs[16] as Q4_0;  w = d * q + m. */
#define QNAME q4_1
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 0), m = LOAD_F16(b, 2);
    for (int i = 0; i < 4; ++i) {
        int q = b[4 + 4 * p + i];
        w[i] = FADD(FMUL((float)(q & 15), d), m);
        w[4 + i] = FADD(FMUL((float)(q >> 4), d), m);
    }
    *o0 = 4 * p;
    *o1 = 16 + 4 * p;
}

#elif defined(QTYPE_Q5_0)
/* Q5_0: d f16 | qh u32 | qs[16]; bit j of qh is the 5th bit of weight j;  w = d * (q - 16). */
#define QNAME q5_0
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 0);
    uint qh = (uint)b[2] | ((uint)b[3] << 8) | ((uint)b[4] << 16) | ((uint)b[5] << 24);
    for (int i = 0; i < 4; ++i) {
        int j = 4 * p + i;
        int q = b[6 + j];
        int lo = (q & 15) | (int)(((qh >> j) & 1u) << 4);
        int hi = (q >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        w[i] = FMUL((float)(lo - 16), d);
        w[4 + i] = FMUL((float)(hi - 16), d);
    }
    *o0 = 4 * p;
    *o1 = 16 + 4 * p;
}

#elif defined(QTYPE_Q5_1)
/* Q5_1: d f16 | m f16 | qh u32 | qs[16];  w = d * q + m. */
#define QNAME q5_1
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 0), m = LOAD_F16(b, 2);
    uint qh = (uint)b[4] | ((uint)b[5] << 8) | ((uint)b[6] << 16) | ((uint)b[7] << 24);
    for (int i = 0; i < 4; ++i) {
        int j = 4 * p + i;
        int q = b[8 + j];
        int lo = (q & 15) | (int)(((qh >> j) & 1u) << 4);
        int hi = (q >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        w[i] = FADD(FMUL((float)lo, d), m);
        w[4 + i] = FADD(FMUL((float)hi, d), m);
    }
    *o0 = 4 * p;
    *o1 = 16 + 4 * p;
}

#elif defined(QTYPE_Q8_0)
/* Q8_0: d f16 | qs[32] int8;  w = d * q.  4 parts of 8 consecutive weights. */
#define QNAME q8_0
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 0);
    for (int i = 0; i < 8; ++i) w[i] = FMUL((float)(signed char)b[2 + 8 * p + i], d);
    *o0 = 8 * p;
    *o1 = 8 * p + 4;
}

#elif defined(QTYPE_Q4_K) || defined(QTYPE_Q5_K)
/* Q4_K: d f16 | dmin f16 | scales[12] | qs[128];  Q5_K adds qh[32] before qs.
   qs[32 * pair + l] = [ q(sub-block 2 pair + 1, lane l) : 4 | q(2 pair, l) : 4 ]
   w = (d * sc_s) * q - dmin * mn_s; six-bit sc/mn unpacked as quants._k_scale_min.
   32 parts: part p reads qs bytes 32 (p / 8) + 4 (p % 8) .. +3, low nibbles in sub-block 2 (p / 8),
   high nibbles in the next one. */
#if defined(QTYPE_Q4_K)
#define QNAME q4_k
#define QS_AT 16
#else
#define QNAME q5_k
#define QS_AT 48
#endif
DEVICE void k_scale_min(const GLOBAL uchar* s, int j, float* sc, float* mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 0), dmin = LOAD_F16(b, 2);
    int pair = p >> 3, l0 = 4 * (p & 7);
    float sc0, mn0, sc1, mn1;
    k_scale_min(b + 4, 2 * pair, &sc0, &mn0);
    k_scale_min(b + 4, 2 * pair + 1, &sc1, &mn1);
    float a0 = FMUL(d, sc0), m0 = FMUL(dmin, mn0), a1 = FMUL(d, sc1), m1 = FMUL(dmin, mn1);
    for (int i = 0; i < 4; ++i) {
        int q = b[QS_AT + 32 * pair + l0 + i];
        int lo = q & 15, hi = q >> 4;
#if defined(QTYPE_Q5_K)
        int h = b[16 + l0 + i];  /* bit s: 5th bit of sub-block s, lane l */
        lo |= ((h >> (2 * pair)) & 1) << 4;
        hi |= ((h >> (2 * pair + 1)) & 1) << 4;
#endif
        w[i] = FSUB(FMUL((float)lo, a0), m0);
        w[4 + i] = FSUB(FMUL((float)hi, a1), m1);
    }
    *o0 = 64 * pair + l0;
    *o1 = 64 * pair + 32 + l0;
}

#elif defined(QTYPE_Q6_K)
/* Q6_K: ql[128] | qh[64] | scales[16] int8 | d f16.  Weight 128 h + 32 j + l:
   low 4 bits in ql[64 h + 32 (j % 2) + l] (low nibble for j < 2), high 2 in qh[32 h + l] >> 2 j;
   w = (d * scale_s) * (q - 32), sub-block s = w / 16.
   32 parts: h = p / 16, jp = (p / 8) % 2, lanes 4 (p % 8) .. +3; run 0 is j = jp, run 1 is j = jp + 2. */
#define QNAME q6_k
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    float d = LOAD_F16(b, 208);
    int h = p >> 4, jp = (p >> 3) & 1, l0 = 4 * (p & 7);
    int s0 = (128 * h + 32 * jp + l0) >> 4, s1 = s0 + 4;
    float a0 = FMUL(d, (float)(signed char)b[192 + s0]);
    float a1 = FMUL(d, (float)(signed char)b[192 + s1]);
    for (int i = 0; i < 4; ++i) {
        int l = l0 + i;
        int ql = b[64 * h + 32 * jp + l], qh = b[128 + 32 * h + l];
        int lo = (ql & 15) | (((qh >> (2 * jp)) & 3) << 4);
        int hi = (ql >> 4) | (((qh >> (2 * jp + 4)) & 3) << 4);
        w[i] = FMUL((float)(lo - 32), a0);
        w[4 + i] = FMUL((float)(hi - 32), a1);
    }
    *o0 = 128 * h + 32 * jp + l0;
    *o1 = *o0 + 64;
}

#elif defined(QTYPE_F16)
/* F16 rows, read 8 weights (16 bytes) at a time. */
#define QNAME f16
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    for (int i = 0; i < 8; ++i) w[i] = LOAD_F16(b, 2 * i);
    *o0 = 0;
    *o1 = 4;
}

#elif defined(QTYPE_F32)
#define QNAME f32
DEVICE void dequant_part(const GLOBAL uchar* b, int p, float* w, int* o0, int* o1) {
    const GLOBAL float* f = (const GLOBAL float*)b;
    for (int i = 0; i < 8; ++i) w[i] = f[i];
    *o0 = 0;
    *o1 = 4;
}
#else
#error "define one QTYPE_*"
#endif

#define PARTS (QK / 8)
#define CAT2_(a, b) a##b
#define CAT2(a, b) CAT2_(a, b)
#define MAX_NT 8

/* Y[t, y_off + r] = sum_k W[r, k] X[t, k] for rows r of this group's warps and tokens
   t0 .. t0 + NT - 1 (those < n_tok). One warp per row; the group is ROWS_PER_GROUP warps. */
DEVICE void matvec_body(const GLOBAL uchar* RESTRICT W, const GLOBAL float* RESTRICT X,
                        GLOBAL float* RESTRICT Y, int n_rows, int n_cols, int n_tok, int ld_y,
                        int y_off, SHARED_PTR float* scratch, const int NT) {
    int lane = LOCAL_ID & 31;
    int row = GROUP_ID * (LOCAL_SIZE >> 5) + (LOCAL_ID >> 5);
    int t0 = GROUP_ID_Y * NT;
    float acc[MAX_NT];
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    if (row < n_rows) {
        const GLOBAL uchar* w_row = W + (size_t)row * (size_t)(n_cols / QK * QTS);
        int n_parts = n_cols / QK * PARTS;
        for (int g = lane; g < n_parts; g += 32) {
            int blk = g / PARTS;
            float w[8];
            int o0, o1;
            dequant_part(w_row + (size_t)blk * QTS, g % PARTS, w, &o0, &o1);
            for (int t = 0; t < NT; ++t) {
                if (t0 + t < n_tok) {
                    const GLOBAL float* x = X + (size_t)(t0 + t) * n_cols + blk * QK;
                    float4 a = LOAD_F32x4(x + o0);
                    float4 c = LOAD_F32x4(x + o1);
                    float s = acc[t];
                    s += w[0] * a.x; s += w[1] * a.y; s += w[2] * a.z; s += w[3] * a.w;
                    s += w[4] * c.x; s += w[5] * c.y; s += w[6] * c.z; s += w[7] * c.w;
                    acc[t] = s;
                }
            }
        }
    }
    for (int t = 0; t < NT; ++t) acc[t] = WARP_SUM(acc[t], scratch);
    if (row < n_rows && lane == 0) {
        for (int t = 0; t < NT; ++t)
            if (t0 + t < n_tok) Y[(size_t)(t0 + t) * ld_y + y_off + row] = acc[t];
    }
}

KERNEL CAT2(matvec1_, QNAME)(const GLOBAL uchar* RESTRICT W, const GLOBAL float* RESTRICT X,
                             GLOBAL float* RESTRICT Y, int n_rows, int n_cols, int n_tok, int ld_y,
                             int y_off) {
    SHARED float scratch[REDUCE_SCRATCH];
    matvec_body(W, X, Y, n_rows, n_cols, n_tok, ld_y, y_off, scratch, 1);
}

KERNEL CAT2(matvec8_, QNAME)(const GLOBAL uchar* RESTRICT W, const GLOBAL float* RESTRICT X,
                             GLOBAL float* RESTRICT Y, int n_rows, int n_cols, int n_tok, int ld_y,
                             int y_off) {
    SHARED float scratch[REDUCE_SCRATCH];
    matvec_body(W, X, Y, n_rows, n_cols, n_tok, ld_y, y_off, scratch, 8);
}

/* out[i, :] = row rows[i] of W, dequantized to float32; one group per output row. */
KERNEL CAT2(dequant_, QNAME)(const GLOBAL uchar* RESTRICT W, const GLOBAL int* RESTRICT rows,
                             GLOBAL float* RESTRICT out, int n_cols) {
    const GLOBAL uchar* w_row = W + (size_t)rows[GROUP_ID] * (size_t)(n_cols / QK * QTS);
    GLOBAL float* o = out + (size_t)GROUP_ID * n_cols;
    int n_parts = n_cols / QK * PARTS;
    for (int g = LOCAL_ID; g < n_parts; g += LOCAL_SIZE) {
        int blk = g / PARTS;
        float w[8];
        int o0, o1;
        dequant_part(w_row + (size_t)blk * QTS, g % PARTS, w, &o0, &o1);
        for (int i = 0; i < 4; ++i) {
            o[blk * QK + o0 + i] = w[i];
            o[blk * QK + o1 + i] = w[4 + i];
        }
    }
}
"""

OPS_SOURCE = r"""
/* RMSNorm (arXiv:1910.07467): Y = X * (1 / sqrt(mean(X^2) + eps)) * w, one group per row. */
KERNEL rms_norm(const GLOBAL float* RESTRICT X, const GLOBAL float* RESTRICT w,
                GLOBAL float* RESTRICT Y, int n_cols, float eps) {
    SHARED float scratch[REDUCE_SCRATCH];
    const GLOBAL float* x = X + (size_t)GROUP_ID * n_cols;
    GLOBAL float* y = Y + (size_t)GROUP_ID * n_cols;
    float ss = 0.0f;
    for (int i = LOCAL_ID; i < n_cols; i += LOCAL_SIZE) ss += x[i] * x[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / SQRT(ss / (float)n_cols + eps);
    for (int i = LOCAL_ID; i < n_cols; i += LOCAL_SIZE) y[i] = x[i] * inv * w[i];
}

/* RoPE (arXiv:2104.09864) of X (n, heads, hd) at positions pos (n,), one thread per element.
   X rows are x_row_stride floats apart from x_off on (a slice of a fused qkv row works in place).
   Interleaved pairs (x[2i], x[2i+1]) or NeoX pairs (x[i], x[i + n_rot]); dims past 2 n_rot are kept. */
KERNEL rope(const GLOBAL float* RESTRICT X, int x_off, int x_row_stride, GLOBAL float* RESTRICT Y,
            const GLOBAL int* RESTRICT pos, const GLOBAL float* RESTRICT cos_t,
            const GLOBAL float* RESTRICT sin_t, int n_heads, int hd, int n_rot, int neox, int n_total) {
    int idx = GROUP_ID * LOCAL_SIZE + LOCAL_ID;
    if (idx >= n_total) return;
    int tok = idx / (n_heads * hd), rem = idx % (n_heads * hd);
    int d = rem % hd;
    const GLOBAL float* x = X + x_off + (size_t)tok * x_row_stride + (rem - d);
    float y;
    if (d >= 2 * n_rot) {
        y = x[d];
    } else {
        int i = neox ? (d < n_rot ? d : d - n_rot) : d >> 1;
        int first = neox ? d < n_rot : (d & 1) == 0;
        float x0 = neox ? x[i] : x[d & ~1];
        float x1 = neox ? x[i + n_rot] : x[d | 1];
        size_t t = (size_t)pos[tok] * n_rot + i;
        float c = cos_t[t], s = sin_t[t];
        y = first ? x0 * c - x1 * s : x0 * s + x1 * c;
    }
    Y[idx] = y;
}

/* SwiGLU (arXiv:2002.05202): Y (n, f) = silu(gate) * up of GU (n, 2f) packed [gate | up]. */
KERNEL silu_mul(const GLOBAL float* RESTRICT GU, GLOBAL float* RESTRICT Y, int f, int n_total) {
    int idx = GROUP_ID * LOCAL_SIZE + LOCAL_ID;
    if (idx >= n_total) return;
    int r = idx / f, c = idx % f;
    float g = GU[(size_t)r * 2 * f + c], u = GU[(size_t)r * 2 * f + f + c];
    Y[idx] = g / (1.0f + EXP(-g)) * u;
}

/* Causal grouped-query attention over a paged KV cache; one group per (head, query).
   Key/value of kv head kh at position p: K[table[p / block_size] * block_stride + kh * head_stride
   + (p % block_size) * hd + d]. A contiguous cache is one block (table = {0}).
   Online softmax over chunks of LOCAL_SIZE keys (FlashAttention, arXiv:2205.14135): every thread
   scores one key of the chunk, then every thread accumulates its own output dims over the chunk. */
#define ATT_DIMS (MAX_HEAD_DIM / ATT_GROUP)
KERNEL attention(const GLOBAL float* RESTRICT Q, const GLOBAL float* RESTRICT K,
                 const GLOBAL float* RESTRICT V, const GLOBAL int* RESTRICT table, int block_size,
                 i64 block_stride, i64 head_stride, const GLOBAL int* RESTRICT q_pos,
                 GLOBAL float* RESTRICT O, int n_heads, int n_kv_heads, int hd, float scale) {
    SHARED float q[MAX_HEAD_DIM];
    SHARED float p[ATT_GROUP];
    SHARED float scratch[REDUCE_SCRATCH];
    int h = GROUP_ID, i = GROUP_ID_Y, tid = LOCAL_ID;
    int kh = h / (n_heads / n_kv_heads);
    size_t q_at = ((size_t)i * n_heads + h) * hd;
    for (int d = tid; d < hd; d += ATT_GROUP) q[d] = Q[q_at + d];
    BARRIER();
    int t = q_pos[i] + 1;  /* keys 0 .. q_pos[i] */
    float m = -INF_F, l = 0.0f;
    float acc[ATT_DIMS];
    for (int e = 0; e < ATT_DIMS; ++e) acc[e] = 0.0f;
    for (int c0 = 0; c0 < t; c0 += ATT_GROUP) {
        int j = c0 + tid;
        float s = -INF_F;
        if (j < t) {
            const GLOBAL float* k = K + table[j / block_size] * block_stride + kh * head_stride
                                      + (size_t)(j % block_size) * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) dot += q[d] * k[d];
            s = dot * scale;
        }
        float m_new = FMAX(m, block_max(s, scratch));
        float pj = j < t ? EXP(s - m_new) : 0.0f;
        float corr = EXP(m - m_new);
        l = l * corr + block_sum(pj, scratch);
        p[tid] = pj;
        BARRIER();
        int n_c = t - c0 < ATT_GROUP ? t - c0 : ATT_GROUP;
        for (int e = 0; e < ATT_DIMS; ++e) {
            int d = tid + e * ATT_GROUP;
            if (d < hd) {
                float a = acc[e] * corr;
                for (int jj = 0; jj < n_c; ++jj) {
                    int jk = c0 + jj;
                    a += p[jj] * V[table[jk / block_size] * block_stride + kh * head_stride
                                   + (size_t)(jk % block_size) * hd + d];
                }
                acc[e] = a;
            }
        }
        m = m_new;  /* p is rewritten only after the barriers of the next block_max */
    }
    float inv = 1.0f / l;
    for (int e = 0; e < ATT_DIMS; ++e) {
        int d = tid + e * ATT_GROUP;
        if (d < hd) O[q_at + d] = acc[e] * inv;
    }
}

/* The k largest logits of each row (one group per row), highest first, ties to the lowest id (the
   sampler's order), and the row's log-sum-exp. Pick r is the best element strictly after pick r-1
   in that order, so nothing is marked or sorted: k passes over the row, for small k. */
KERNEL top_k(const GLOBAL float* RESTRICT L, int n_vocab, int k, GLOBAL float* RESTRICT out_v,
             GLOBAL int* RESTRICT out_i, GLOBAL float* RESTRICT out_lse) {
    SHARED float sv[REDUCE_SCRATCH];
    SHARED int si[REDUCE_SCRATCH];
    const GLOBAL float* x = L + (size_t)GROUP_ID * n_vocab;
    float m = -INF_F;
    for (int j = LOCAL_ID; j < n_vocab; j += LOCAL_SIZE) m = FMAX(m, x[j]);
    m = block_max(m, sv);
    float s = 0.0f;
    for (int j = LOCAL_ID; j < n_vocab; j += LOCAL_SIZE) s += EXP(x[j] - m);
    s = block_sum(s, sv);
    if (LOCAL_ID == 0) out_lse[GROUP_ID] = m + LOG(s);
    float pv = INF_F;
    int pi = -1;
    for (int r = 0; r < k; ++r) {
        float bv = -INF_F;
        int bi = 0x7fffffff;
        for (int j = LOCAL_ID; j < n_vocab; j += LOCAL_SIZE) {
            float v = x[j];
            int after = v < pv || (v == pv && j > pi);
            if (after && (v > bv || (v == bv && j < bi))) { bv = v; bi = j; }
        }
        block_argmax(&bv, &bi, sv, si);
        if (LOCAL_ID == 0) {
            out_v[(size_t)GROUP_ID * k + r] = bv;
            out_i[(size_t)GROUP_ID * k + r] = bi;
        }
        pv = bv;
        pi = bi;
    }
}
"""


@dataclass(frozen=True)
class ProgramSpec:
    """One translation unit: a source, its defines and the kernels it holds."""

    name: str
    source: str
    defines: dict[str, object] = field(default_factory=dict)
    kernels: tuple[str, ...] = ()


MATVEC_ROWS_PER_GROUP = 4  # warps (rows) per matvec group: 128 threads
ATT_GROUP = 128  # threads per attention group (keys per chunk)
MAX_HEAD_DIM = 256


def quant_program(t: T) -> ProgramSpec:
    dt = DEVICE_TYPES[t]
    defines = {f"QTYPE_{t.name}": 1, "QK": dt.block_size, "QTS": dt.type_size}
    return ProgramSpec(f"quant_{dt.name}", QUANT_SOURCE, defines,
                       (f"matvec1_{dt.name}", f"matvec8_{dt.name}", f"dequant_{dt.name}"))


OPS_PROGRAM = ProgramSpec("ops", OPS_SOURCE, {"ATT_GROUP": ATT_GROUP, "MAX_HEAD_DIM": MAX_HEAD_DIM},
                          ("rms_norm", "rope", "silu_mul", "attention", "top_k"))


def all_programs() -> list[ProgramSpec]:
    return [quant_program(t) for t in DEVICE_TYPES] + [OPS_PROGRAM]
