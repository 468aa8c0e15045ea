// Fused on-the-fly dictionary matching: the dictionary never reaches global memory.
//
// Contract (NumPy reference: dpm.fused.match_on_the_fly on NumPy arrays, i.e.
// dpm.match.match on dpm.dictionary.Dictionary.chunk rows):
//   For every experimental row p_r (r < n) and every orientation i (i < m), the
//   kernel scores the normalised cross-correlation
//       s(r, i) = sum_q p_r[q] (d_i[q] - mean(d_i)) / || d_i - mean(d_i) ||
//   where d_i[q] is the master pattern at the crystal direction R(q_i) v_q of
//   detector pixel q (rotation, square Lambert projection and bilinear lookup
//   exactly as kernels/project.cu), and keeps the best k per row: descending
//   score, among equal scores ascending orientation index (the tie rule of
//   kernels/topk.cu). Both operands are rounded to the precision first (below),
//   and the mean and norm are those of the rounded d_i. The sum is evaluated in
//   one pass over the pixels as
//       s = (sum p d  -  mean(d) sum p) * inv,   inv = 1 / sqrt(npix var(d)),
//   with sum d, sum d^2 (for mean and var) accumulated in double by the threads
//   that generate d; sum p (~0: the rows are zero-mean, but not exactly after
//   rounding) is computed once per block. A constant dictionary row (var(d) at
//   most (16 float32 ulps of its mean)^2, project.cu's rule) gets inv = 0 and
//   scores exactly 0 against every pattern, as its all-zero row does in the
//   NumPy path. NaN scores never enter a top-k list.
//
//   Master pattern: the launcher passes hemispheres pre-scaled to zero mean and
//   unit standard deviation over both hemispheres. An affine change of the
//   master is an affine change of every d_i, which the NCC ignores (the
//   bilinear weights sum to 1), so the scores do not change beyond rounding;
//   but the raw values the kernel rounds to FP16 are then O(1), far from the
//   FP16 overflow (65504) and subnormal (6e-5) limits whatever the master's
//   units (counts, 0-255, ...), and the mean that the one-pass formula removes
//   is small against the spread, so little precision is lost to cancellation.
//
// Precision (one kernel per option; operands rounded, accumulation in FP32):
//   fused_match_fp32  no rounding;
//   fused_match_tf32  d and p rounded to TF32 (10-bit mantissa, round to nearest,
//                     ties away from zero: cvt.rna.tf32.f32), stored as float;
//   fused_match_fp16  d and p rounded to IEEE half (round to nearest even),
//                     stored as half in shared memory (half the bytes).
//   fused_round_operands applies the same rounding to an array, so the tests
//   check it bit for bit against dpm.fused.round_to_precision.
//   None of the kernels uses tensor cores (mma.sync/wgmma are warp-level and
//   cannot run through kernels/host_shim.h): TF32/FP16 here give the accuracy
//   of a tensor-core version, and FP16 halves the shared-memory tiles, but the
//   products run on the FP32 CUDA cores at the FP32 rate.
//
// Layout (all C-contiguous):
//   northern, southern (side, side) float32, pre-scaled (see above);
//   vectors (npix, 3) float32, sample-frame unit directions of the used
//   (masked) pixels; quaternions (m, 4) float32 (a, b, c, d), sample -> crystal;
//   patterns (n, npix) float32, zero-mean unit-norm rows over the same pixels
//   (dpm.match.prepare_patterns); part_scores (slices, n, k) float32 and
//   part_indices (slices, n, k) int64: the top-k of row r over the orientations
//   of slice y at [y, r, :], empty slots (fewer than k orientations in the
//   slice) index -1, score -inf, at the tail. k <= FUSED_MAX_K.
//
// Launch geometry (set in dpm/fused.py):
//   block = FUSED_THREADS = 256 threads; block (x, y) owns patterns
//     x*TP .. x*TP+TP-1 (TP = 128) and the orientation tiles (TD = 64 each)
//     y*T .. y*T+T-1, T = tiles_per_slice.
//   For each orientation tile, the pixels are walked in chunks of KC = 32:
//     * generate: thread t computes orientation t/4 at pixels t%4 + 4j
//       (j < 8) of the chunk -- rotation, Lambert, bilinear from the master in
//       global memory (__ldg: read-only, L2-resident) -- and stores the rounded
//       values into D[KC][TD] in shared memory, accumulating sum d, sum d^2
//       for its orientation (4 partial sums per orientation, reduced per tile);
//     * load: the TP x KC pattern sub-tile into P[KC][TP] (each warp reads
//       4 rows x 8 consecutive pixels: four fully used 32-byte sectors; the
//       transposed shared stores hit 32 distinct banks);
//     * multiply: thread (tx = t%16, ty = t/16) accumulates a register
//       micro-tile of 8 patterns (ty*8..) x 4 orientations (tx*4..), i.e.
//       32 FMAs per 12 shared loads (two float4 of P, one float4 of D).
//   After the tile: the scores are normalised, staged through shared memory
//   (the P/D buffers reused), and thread r < TP folds the 64 scores of its
//   pattern into a running top-k that it keeps in its local arrays across all
//   tiles of the slice (one compare against its k-th best rejects almost every
//   candidate after the first tiles). At the end each owner writes its list.
//   grid = (ceil(n / TP), slices): the slices split the orientation range so
//   that a small map still fills the 132 SMs of an H100: the launcher takes
//   floor(4 * 132 / columns) slices (at least 1), at most two full waves of
//   the 2 blocks an SM holds at once (2 400 patterns: 19 x 27 = 513 blocks,
//   59 tiles each); fused_merge_slices then merges the slices' lists per
//   pattern (one thread per pattern; no merge when slices == 1).
//   Static shared memory: max(P + D, scores, row sums) = 33 280 B (the score
//   staging, 128 x 65 floats; P + D are 26 112 B in FP32, 13 056 B in FP16)
//   + 7 424 B of rotations, sums and statistics = 40 704 B per block (< 48 KB,
//   no opt-in needed).
//   ptxas (CUDA 13.0, -std=c++17): sm_90 111 registers (FP32), 110 (TF32),
//   127 (FP16); sm_80 100, 96, 96; no spills, 256 B of stack for the owners'
//   top-k lists. Registers bound the residency: 256 x 112 (or 128) of the
//   65 536 per SM = 2 blocks (16 warps) per SM, 81 KB of its 228 KB of
//   shared memory.
//
// Expected H100 SXM throughput. ESTIMATES from operation and byte counts, not
// measurements (no GPU has run this kernel yet). P = npix = 3 600 (60 x 60
// px); a "pair" = one pattern against one orientation; H100 SXM: 132 SMs at
// 1.98 GHz, FP32 67 TFLOP/s without tensor cores, FP64 34 TFLOP/s, HBM3
// 3.35 TB/s, 50 MB L2, 228 KB shared memory per SM.
//   FLOPs per pair
//     products: 1 FMA = 2 FLOP per pixel: 2 P = 7 200.
//     generation, per (orientation, pixel): rotation 15 (9 mul + 6 add),
//       Lambert ~33 (norm, divide, sqrt, atanf ~20, scalings), bilinear ~23
//       (coordinates, clamps, weights, 4-term sum), rounding 2, sum d and
//       sum d^2 in FP64 3 = ~6 FP32-equivalent at FP64's half rate: ~80.
//       Each generated pixel serves TP = 128 patterns: 80 P / 128 = 2 250.
//     scores and top-k, per pair once: ~4.
//     Total ~9 450 FLOP per pair (76 % products). At 67 TFLOP/s: at most
//     7.1e9 pairs/s; at ~65 % of peak (register-tiled FP32 loops with
//     barrier-separated generation phases, 16 warps per SM): ~4.6e9 pairs/s.
//   L2 -> SM bytes per pair (worst case: no L1 hits)
//     master gathers: the 4 nodes lie in 2 rows, c0 and c1 mostly in one
//       32-B sector (7/8), so ~2.25 sectors = 72 B per generated pixel,
//       / TP = 0.56 B per pixel: 2 025 B;
//     pattern sub-tiles: each block reads its 128 x P tile once per
//       64-orientation tile: 4 P / 64 = 225 B;
//     direction vectors: 12 P B per (128 x 64) pairs: 5 B.
//     Total ~2 250 B per pair. The H100's L2 bandwidth is not a datasheet
//     figure; at an assumed ~5.5 TB/s (microbenchmark figures): ~2.4e9
//     pairs/s. Neighbouring pixels of one orientation land ~4 Lambert cells
//     apart (1.2 deg mean pixel angle, ~0.3 deg cells at npx = 250), so L1
//     (~170 KB left per SM) catches part of the gathers, and the rate lies
//     between this gather bound and the FLOP bound.
//   Shared memory per pair: per pixel each warp reads 16 distinct float4 of D
//     (256 B) and 2 x 2 broadcast float4 of P (64 B): 8 x 320 B per 128 x 64
//     pairs = 0.31 B per pixel, 1 125 B per pair; at 128 B/clock/SM (33.5
//     TB/s) 3e10 pairs/s: not a bound.
//   DRAM bytes: the 2 x 501^2 float32 master (2 MB) stays in L2; the 2 400 x
//     3 600 float32 patterns (35 MB, 14.4 KB per pattern) are read about once
//     (a column's slices run together; if every slice re-read its tile from
//     DRAM, 27 x 35 MB = 0.93 GB, 0.3 ms at 3.35 TB/s); the output is slices x
//     n x k x 12 B (7.8 MB at k = 10). ~0.2 B per pair: far from a bound.
//   Expected, 2 deg Li dictionary (100 347 orientations, 7.2e8 product FLOP
//   per pattern): 2.4e9 - 4.6e9 pairs/s = 24 000 - 46 000 patterns/s, i.e.
//   23 - 44 TFLOP/s executed (17 - 33 TFLOP/s of NCC products); the 2 400-
//   pattern bench map in 0.05 - 0.10 s, 1e6 patterns in 22 - 42 s.
//   Against the GEMM path (dictionary projected once: 1.45 GB at 60 x 60 px,
//   then SGEMM at ~50 TFLOP/s = ~7e9 pairs/s on the CUDA cores): 1.5 - 3x
//   slower, but without the dictionary in memory, the chunk loop or score
//   tiles, and with the dictionary regenerated for free when the pattern
//   centre changes. Tensor cores (TF32 ~495, FP16 ~990 TFLOP/s dense) would
//   make the 7 200 product FLOPs an afterthought and leave the gathers
//   (0.56 B per pixel per pair at TP = 128) as the bound; only a larger
//   pattern tile (TP = 512: 0.14 B, ~730 B per pair with the pattern reads)
//   would then raise the rate, to ~7.5e9 pairs/s. This kernel does not use
//   them (see Precision).

#ifndef DPM_HOST_SHIM
#include <cuda_fp16.h>
#endif

// Must equal the constants of the same meaning in dpm/fused.py (checked by the tests).
#define FUSED_TP 128        // patterns per block
#define FUSED_TD 64         // orientations per tile
#define FUSED_KC 32         // pixels per chunk
#define FUSED_THREADS 256   // threads per block
#define FUSED_MAX_K 32      // largest k (local top-k arrays of the owners)
#define FUSED_MP 8          // patterns per thread (micro-tile rows)
#define FUSED_MD 4          // orientations per thread (micro-tile columns)

// Shared row strides in elements: P rows padded by 4 and D rows by 8 keep every
// micro-tile load 16-byte aligned and the generating/transposing stores on 32
// distinct banks (FP32); the score rows (64 + 1) make the owners' column reads
// conflict-free.
#define FUSED_PSTRIDE (FUSED_TP + 4)
#define FUSED_DSTRIDE (FUSED_TD + 8)
#define FUSED_SSTRIDE (FUSED_TD + 1)

#define FUSED_FP32 0
#define FUSED_TF32 1
#define FUSED_FP16 2

// Spread threshold for a "constant" row: std <= 16 float32 ulps of the mean (project.cu).
#define FUSED_CONSTANT_RTOL (16.0 * 1.1920928955078125e-07)

// ------------------------------------------------------------------ rounding

// TF32: keep 10 mantissa bits, round to nearest with ties away from zero
// (cvt.rna.tf32.f32); infinities and NaN unchanged, overflow to infinity.
__device__ inline float fused_round_tf32(float x)
{
    const unsigned int bits = (unsigned int)__float_as_int(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) {
        return x;
    }
    return __int_as_float((int)((bits + 0x1000u) & 0xffffe000u));
}

#ifdef DPM_HOST_SHIM
// The host shim has no __half: IEEE binary16 in a uint16_t, with software
// conversions that round to nearest even exactly as __float2half_rn does.
typedef unsigned short fused_half;

__device__ inline fused_half fused_float_to_half(float f)
{
    const unsigned int x = (unsigned int)__float_as_int(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {  // infinity or NaN (quiet NaN keeps its sign)
        return (fused_half)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    }
    if (ax >= 0x477ff000u) {  // >= 65520 rounds to infinity
        return (fused_half)(sign | 0x7c00u);
    }
    if (ax >= 0x38800000u) {  // normal half (>= 2^-14): round the mantissa to 10 bits
        ax += 0x0fffu + ((ax >> 13) & 1u);  // nearest, ties to even
        ax -= 0x38000000u;                  // rebias the exponent (127 -> 15)
        return (fused_half)(sign | (ax >> 13));
    }
    // Subnormal half (units of 2^-24) or zero: adding 0.5f aligns the units
    // with the last mantissa bit of the sum, and the float addition rounds to
    // nearest even; 2^-14 itself becomes 0x400, the smallest normal.
    const float shifted = __int_as_float((int)ax) + 0.5f;
    return (fused_half)(sign | ((unsigned int)__float_as_int(shifted) - 0x3f000000u));
}

__device__ inline float fused_half_to_float(fused_half h)
{
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int exponent = ((unsigned int)h >> 10) & 0x1fu;
    const unsigned int mantissa = (unsigned int)h & 0x3ffu;
    if (exponent == 0u) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31u) {
        return __int_as_float((int)(sign | 0x7f800000u | (mantissa << 13)));
    }
    return __int_as_float((int)(sign | ((exponent + 112u) << 23) | (mantissa << 13)));
}
#else
typedef __half fused_half;

__device__ inline fused_half fused_float_to_half(float f) { return __float2half_rn(f); }
__device__ inline float fused_half_to_float(fused_half h) { return __half2float(h); }
#endif

// Storage type and rounding of the operands for one precision option.
template <int PREC> struct FusedPrecision;

template <> struct FusedPrecision<FUSED_FP32> {
    typedef float storage;
    static __device__ inline float round(float x) { return x; }
    static __device__ inline storage store(float x) { return x; }
};

template <> struct FusedPrecision<FUSED_TF32> {
    typedef float storage;
    static __device__ inline float round(float x) { return fused_round_tf32(x); }
    static __device__ inline storage store(float x) { return x; }  // already rounded
};

template <> struct FusedPrecision<FUSED_FP16> {
    typedef fused_half storage;
    static __device__ inline float round(float x)
    {
        return fused_half_to_float(fused_float_to_half(x));
    }
    static __device__ inline storage store(float x) { return fused_float_to_half(x); }
};

// Load n consecutive shared operands as floats (n = 8 or 4; 16-byte aligned for float).
__device__ inline void fused_load(const float* p, float* out, int count)
{
    for (int i = 0; i < count; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(p + i);
        out[i] = v.x;
        out[i + 1] = v.y;
        out[i + 2] = v.z;
        out[i + 3] = v.w;
    }
}

__device__ inline void fused_load(const fused_half* p, float* out, int count)
{
#ifdef DPM_HOST_SHIM
    for (int i = 0; i < count; ++i) {
        out[i] = fused_half_to_float(p[i]);
    }
#else
    const __half2* pairs = reinterpret_cast<const __half2*>(p);
    for (int i = 0; i < count / 2; ++i) {
        const float2 v = __half22float2(pairs[i]);
        out[2 * i] = v.x;
        out[2 * i + 1] = v.y;
    }
#endif
}

// ------------------------------------------------------ projection helpers
// dpm_vector_to_lambert / dpm_lambert_bilinear, shared with kernels/project.cu.
#include "lambert.cuh"

// --------------------------------------------------------------- top-k lists

// True when candidate (s, i) ranks before entry (t, j): higher score first,
// then lower index; an empty entry (j < 0) loses to any non-NaN candidate;
// NaN beats nothing (as topk_beats in kernels/topk.cu).
__device__ inline bool fused_beats(float s, long long i, float t, long long j)
{
    if (j < 0) {
        return s == s;
    }
    return s > t || (s == t && i < j);
}

// Insert (s, i), known to beat entry k-1 (or to fill a free slot), into a
// sorted list of `count` entries, keeping at most k.
__device__ inline void fused_insert(float* list_s, int* list_i, int* count, int k, float s, int i)
{
    int p = *count < k ? *count : k - 1;
    if (*count < k) {
        *count += 1;
    }
    while (p > 0 && fused_beats(s, i, list_s[p - 1], list_i[p - 1])) {
        list_s[p] = list_s[p - 1];
        list_i[p] = list_i[p - 1];
        --p;
    }
    list_s[p] = s;
    list_i[p] = i;
}

// ------------------------------------------------------------- the kernel body

// -inf without <math.h> (NVRTC has no INFINITY macro).
#define FUSED_NEG_INF __int_as_float((int)0xff800000u)

#define FUSED_MAX2(a, b) ((a) > (b) ? (a) : (b))

template <int PREC>
__device__ inline void fused_match_body(
    const float* __restrict__ northern, const float* __restrict__ southern, const int side,
    const float* __restrict__ vectors, const int npix,
    const float* __restrict__ quaternions, const int m,
    const float* __restrict__ patterns, const int n,
    const int k, const int tiles_per_slice,
    float* __restrict__ part_scores, long long* __restrict__ part_indices)
{
    typedef FusedPrecision<PREC> Prec;
    typedef typename Prec::storage T;
    constexpr int P_BYTES = FUSED_KC * FUSED_PSTRIDE * (int)sizeof(T);
    constexpr int D_BYTES = FUSED_KC * FUSED_DSTRIDE * (int)sizeof(T);
    constexpr int S_BYTES = FUSED_TP * FUSED_SSTRIDE * (int)sizeof(float);
    constexpr int SUM_BYTES = FUSED_TP * 33 * (int)sizeof(float);
    constexpr int BUFFER_BYTES = FUSED_MAX2(FUSED_MAX2(P_BYTES + D_BYTES, S_BYTES), SUM_BYTES);
    static_assert(P_BYTES % 16 == 0, "the D tile must start 16-byte aligned");

    // One buffer, three uses in turn: the sums of the pattern rows (prologue),
    // the P and D sub-tiles (pixel loop), the scores of a tile (top-k update).
    __align__(16) __shared__ unsigned char buffer[BUFFER_BYTES];
    __shared__ float rot[FUSED_TD][9];              // row-major R(q) per orientation
    __shared__ double partial[FUSED_THREADS][2];    // per-thread sum d, sum d^2
    __shared__ float mean_d[FUSED_TD];
    __shared__ float inv_d[FUSED_TD];
    __shared__ float sum_p[FUSED_TP];
    T* P = reinterpret_cast<T*>(buffer);
    T* D = reinterpret_cast<T*>(buffer + P_BYTES);
    float* S = reinterpret_cast<float*>(buffer);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int row0 = blockIdx.x * FUSED_TP;

    // Prologue: sum of each rounded pattern row (warp w: rows w, w + 8, ...).
    float* row_partial = reinterpret_cast<float*>(buffer);  // [TP][33]
    for (int i = 0; i < FUSED_TP / 8; ++i) {
        const int r = warp + 8 * i;
        const long long row = row0 + r;
        float s = 0.0f;
        if (row < n) {
            const float* src = patterns + row * npix;
            for (int q = lane; q < npix; q += 32) {
                s += Prec::round(src[q]);
            }
        }
        row_partial[r * 33 + lane] = s;
    }
    __syncthreads();
    if (tid < FUSED_TP) {
        float s = 0.0f;
        for (int l = 0; l < 32; ++l) {
            s += row_partial[tid * 33 + l];
        }
        sum_p[tid] = s;
    }
    // (The first tile's barrier orders these reads before the buffer is reused.)

    // Running top-k of pattern row0 + tid, owned by thread tid < TP.
    const bool owner = tid < FUSED_TP && row0 + tid < n;
    float list_s[FUSED_MAX_K];
    int list_i[FUSED_MAX_K];
    int count = 0;
    float thr_s = 0.0f;  // the list's k-th entry once full; index -1: accept any
    int thr_i = -1;

    const int tx = tid & 15;  // micro-tile: orientations tx*4 .. tx*4+3
    const int ty = tid >> 4;  // micro-tile: patterns ty*8 .. ty*8+7
    const int go = tid >> 2;  // generator: orientation of this thread
    const int gk = tid & 3;   // generator: first pixel of the chunk
    const int ntiles = (m + FUSED_TD - 1) / FUSED_TD;
    const int tile_begin = blockIdx.y * tiles_per_slice;
    const int tile_end = min(ntiles, tile_begin + tiles_per_slice);

    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int o0 = tile * FUSED_TD;
        const int valid = min(FUSED_TD, m - o0);
        if (tid < FUSED_TD) {
            float a = 1.0f, b = 0.0f, c = 0.0f, d = 0.0f;
            if (tid < valid) {
                const float* q = quaternions + 4 * (long long)(o0 + tid);
                a = q[0];
                b = q[1];
                c = q[2];
                d = q[3];
            }
            const float s = 1.0f / (a * a + b * b + c * c + d * d);
            float* r = rot[tid];
            r[0] = (a * a + b * b - c * c - d * d) * s;
            r[1] = 2.0f * (b * c - a * d) * s;
            r[2] = 2.0f * (a * c + b * d) * s;
            r[3] = 2.0f * (a * d + b * c) * s;
            r[4] = (a * a - b * b + c * c - d * d) * s;
            r[5] = 2.0f * (c * d - a * b) * s;
            r[6] = 2.0f * (b * d - a * c) * s;
            r[7] = 2.0f * (a * b + c * d) * s;
            r[8] = (a * a - b * b - c * c + d * d) * s;
        }
        __syncthreads();

        float acc[FUSED_MP][FUSED_MD];
        for (int i = 0; i < FUSED_MP; ++i) {
            for (int j = 0; j < FUSED_MD; ++j) {
                acc[i][j] = 0.0f;
            }
        }
        double sum_d = 0.0;
        double sum_d2 = 0.0;
        const float* R = rot[go];
        const bool generating = go < valid;

        for (int p0 = 0; p0 < npix; p0 += FUSED_KC) {
            // Generate D[KC][TD]: orientation go at pixels gk, gk + 4, ...
            for (int j = 0; j < FUSED_KC / 4; ++j) {
                const int kk = gk + 4 * j;
                const int q = p0 + kk;
                float value = 0.0f;
                if (generating && q < npix) {
                    const float x = __ldg(vectors + 3 * q);
                    const float y = __ldg(vectors + 3 * q + 1);
                    const float z = __ldg(vectors + 3 * q + 2);
                    const float xc = R[0] * x + R[1] * y + R[2] * z;
                    const float yc = R[3] * x + R[4] * y + R[5] * z;
                    const float zc = R[6] * x + R[7] * y + R[8] * z;
                    float la, lb;
                    dpm_vector_to_lambert(xc, yc, zc, &la, &lb);
                    value = Prec::round(dpm_lambert_bilinear(
                        zc >= 0.0f ? northern : southern, side, la, lb));
                    sum_d += value;
                    sum_d2 += (double)value * value;
                }
                D[kk * FUSED_DSTRIDE + go] = Prec::store(value);
            }
            // Load P[KC][TP]: sub-tile w + 8 i is 4 rows x 8 consecutive pixels.
            for (int i = 0; i < (FUSED_TP * FUSED_KC) / (32 * 8); ++i) {
                const int sub = warp + 8 * i;
                const int r = (sub >> 2) * 4 + (lane >> 3);
                const int kk = (sub & 3) * 8 + (lane & 7);
                const long long row = row0 + r;
                const int q = p0 + kk;
                const float value = (row < n && q < npix) ? patterns[row * npix + q] : 0.0f;
                P[kk * FUSED_PSTRIDE + r] = Prec::store(Prec::round(value));
            }
            __syncthreads();

            // The whole chunk: pixels past npix hold zeros in P and D.
#pragma unroll 8
            for (int kk = 0; kk < FUSED_KC; ++kk) {
                float a[FUSED_MP];
                float b[FUSED_MD];
                fused_load(P + kk * FUSED_PSTRIDE + ty * FUSED_MP, a, FUSED_MP);
                fused_load(D + kk * FUSED_DSTRIDE + tx * FUSED_MD, b, FUSED_MD);
                for (int i = 0; i < FUSED_MP; ++i) {
                    for (int j = 0; j < FUSED_MD; ++j) {
                        acc[i][j] += a[i] * b[j];
                    }
                }
            }
            __syncthreads();  // before the next chunk (or the scores) overwrite P and D
        }

        // Mean and 1 / norm of each orientation's rounded pattern.
        partial[tid][0] = sum_d;
        partial[tid][1] = sum_d2;
        __syncthreads();
        if (tid < FUSED_TD) {
            double s = 0.0, s2 = 0.0;
            for (int g = 0; g < 4; ++g) {
                s += partial[4 * tid + g][0];
                s2 += partial[4 * tid + g][1];
            }
            const double mean = s / npix;
            const double var = fmax(s2 / npix - mean * mean, 0.0);
            const double tol = FUSED_CONSTANT_RTOL * mean;
            mean_d[tid] = (float)mean;
            inv_d[tid] = var <= tol * tol ? 0.0f : (float)(1.0 / sqrt(var * npix));
        }
        __syncthreads();

        // Normalised scores through shared memory to the owners of the rows.
        for (int i = 0; i < FUSED_MP; ++i) {
            const int r = ty * FUSED_MP + i;
            for (int j = 0; j < FUSED_MD; ++j) {
                const int o = tx * FUSED_MD + j;
                S[r * FUSED_SSTRIDE + o] = (acc[i][j] - mean_d[o] * sum_p[r]) * inv_d[o];
            }
        }
        __syncthreads();
        if (owner) {
            for (int o = 0; o < valid; ++o) {
                const float s = S[tid * FUSED_SSTRIDE + o];
                const int index = o0 + o;
                if (fused_beats(s, index, thr_s, thr_i)) {
                    fused_insert(list_s, list_i, &count, k, s, index);
                    if (count == k) {
                        thr_s = list_s[k - 1];
                        thr_i = list_i[k - 1];
                    }
                }
            }
        }
        __syncthreads();  // the owners have read S before the next tile's P and D
    }

    if (owner) {
        const long long base = ((long long)blockIdx.y * n + row0 + tid) * k;
        for (int j = 0; j < k; ++j) {
            part_scores[base + j] = j < count ? list_s[j] : FUSED_NEG_INF;
            part_indices[base + j] = j < count ? (long long)list_i[j] : -1LL;
        }
    }
}

// __launch_bounds__(256, 2): 256 threads and at least 2 resident blocks per
// SM, so ptxas may use up to 128 registers per thread (the 32 accumulators,
// 12 operands, addresses and the generator's state fit without spills).
// One kernel per precision (extern "C" functions cannot be templates).
extern "C" __global__ void __launch_bounds__(256, 2) fused_match_fp32(
    const float* __restrict__ northern, const float* __restrict__ southern, const int side,
    const float* __restrict__ vectors, const int npix, const float* __restrict__ quaternions,
    const int m, const float* __restrict__ patterns, const int n, const int k,
    const int tiles_per_slice, float* __restrict__ part_scores,
    long long* __restrict__ part_indices)
{
    fused_match_body<FUSED_FP32>(northern, southern, side, vectors, npix, quaternions, m,
                                 patterns, n, k, tiles_per_slice, part_scores, part_indices);
}

extern "C" __global__ void __launch_bounds__(256, 2) fused_match_tf32(
    const float* __restrict__ northern, const float* __restrict__ southern, const int side,
    const float* __restrict__ vectors, const int npix, const float* __restrict__ quaternions,
    const int m, const float* __restrict__ patterns, const int n, const int k,
    const int tiles_per_slice, float* __restrict__ part_scores,
    long long* __restrict__ part_indices)
{
    fused_match_body<FUSED_TF32>(northern, southern, side, vectors, npix, quaternions, m,
                                 patterns, n, k, tiles_per_slice, part_scores, part_indices);
}

extern "C" __global__ void __launch_bounds__(256, 2) fused_match_fp16(
    const float* __restrict__ northern, const float* __restrict__ southern, const int side,
    const float* __restrict__ vectors, const int npix, const float* __restrict__ quaternions,
    const int m, const float* __restrict__ patterns, const int n, const int k,
    const int tiles_per_slice, float* __restrict__ part_scores,
    long long* __restrict__ part_indices)
{
    fused_match_body<FUSED_FP16>(northern, southern, side, vectors, npix, quaternions, m,
                                 patterns, n, k, tiles_per_slice, part_scores, part_indices);
}

// Merge the slices' lists: best_*[r, :] = the k best of part_*[:, r, :] (same
// order and tie rule). Each list is sorted and orientation indices are unique
// across slices, so round j takes, over the slices, the best entry that ranks
// after round j-1's winner (one pass per round: k^2 x slices compares per row,
// a few microseconds of a launch). Fewer than k entries leave (-inf, -1) slots.
// grid = ceil(n / 128) blocks of 128 threads, thread = one pattern row.
extern "C" __global__ void fused_merge_slices(const float* __restrict__ part_scores,
                                              const long long* __restrict__ part_indices,
                                              const int n, const int k, const int slices,
                                              float* __restrict__ best_scores,
                                              long long* __restrict__ best_indices)
{
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) {
        return;
    }
    float prev_s = 0.0f;
    long long prev_i = -1;
    for (int j = 0; j < k; ++j) {
        float best_s = FUSED_NEG_INF;
        long long best_i = -1;
        for (int s = 0; s < slices; ++s) {
            const long long base = ((long long)s * n + row) * k;
            for (int e = 0; e < k; ++e) {
                const long long index = part_indices[base + e];
                if (index < 0) {
                    break;  // empty tail
                }
                const float score = part_scores[base + e];
                if (prev_i >= 0 && !fused_beats(prev_s, prev_i, score, index)) {
                    continue;  // already taken in an earlier round
                }
                if (fused_beats(score, index, best_s, best_i)) {
                    best_s = score;
                    best_i = index;
                }
                break;  // the list is sorted: its first untaken entry is its best
            }
        }
        best_scores[row * k + j] = best_s;
        best_indices[row * k + j] = best_i;
        if (best_i < 0) {
            for (int rest = j + 1; rest < k; ++rest) {
                best_scores[row * k + rest] = FUSED_NEG_INF;
                best_indices[row * k + rest] = -1;
            }
            return;
        }
        prev_s = best_s;
        prev_i = best_i;
    }
}

// out[i] = values[i] rounded as the matching kernels round their operands
// (precision 0: FP32, unchanged; 1: TF32; 2: FP16 and back to float).
// grid = ceil(count / 256) blocks of 256 threads.
extern "C" __global__ void fused_round_operands(const float* __restrict__ values, const int count,
                                                const int precision, float* __restrict__ out)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) {
        return;
    }
    const float v = values[i];
    out[i] = precision == FUSED_FP16 ? FusedPrecision<FUSED_FP16>::round(v)
           : precision == FUSED_TF32 ? FusedPrecision<FUSED_TF32>::round(v)
           : v;
}
