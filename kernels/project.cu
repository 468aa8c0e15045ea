// Project a master pattern onto the detector for a batch of orientations.
//
// Contract (shared with the numba twin dpm.projection._project_numba):
//   out[i, p] = bilinear lookup, on the square Lambert grid of the hemisphere
//   that holds it, of the crystal-frame direction R(q_i) v_p, where v_p is the
//   sample-frame unit vector of detector pixel p and R(q) the active rotation
//   matrix of the scalar-first unit quaternion q = (a, b, c, d) (orix/kikuchipy
//   convention, sample -> crystal). Each row out[i, :] is then made zero-mean
//   and unit-L2-norm over its npix pixels; a row whose spread is below float32
//   resolution of its mean (a constant pattern) becomes all zeros.
//
//   Lambert lookup as kikuchipy / EMsoft: x' = npx * a + npx, y' = npx * b + npx
//   (npx = (side - 1) / 2), c0 = floor(x'), c1 = c0 + 1 clamped to the grid,
//   dx = x' - c0; northern hemisphere when the rotated z >= 0.
//
// Layout: northern, southern (side, side) float32, [row = Lambert y, col = Lambert x];
//   vectors (npix, 3) float32; quaternions (n, 4) float32; out (n, npix) float32.
//   All C-contiguous.
//
// Launch geometry (set in dpm/projection.py):
//   grid  = ceil(n / DPM_PROJECT_TILE) blocks; block b projects orientations
//           b*TILE .. b*TILE+TILE-1, so every direction vector read from global
//           memory is reused for TILE orientations.
//   block = power of two, 32..256 threads (at most 256: launch bounds); thread t handles pixels t, t + B, ...
//           (consecutive threads -> consecutive pixels: coalesced vector loads
//           and coalesced stores of each output row).
//   dynamic shared memory = 2 * TILE * blockDim.x doubles (partial sums).
//
// Expected H100 cost per pattern of P pixels (P = 3600 for 60 x 60):
//   FLOPs: ~45 per pixel (9 FMA rotation; Lambert: sqrt + atan + ~12; bilinear
//   ~12; statistics 4; normalisation 2) -> ~0.16 MFLOP per pattern; at
//   ~50 TFLOP/s fp32 that alone would allow ~3e8 patterns/s.
//   DRAM bytes: the output, 4 B/pixel written (the normalisation pass rereads
//   and rewrites it, mostly in L2) -> 14.4 KB per pattern, ~2e8 patterns/s at
//   3 TB/s. L2 bytes: direction vectors 12 B/pixel / TILE; master-pattern
//   gathers 4 x 4 B per pixel in ~2 distinct 32 B sectors -> ~64 B/pixel,
//   ~230 KB per pattern (a 2 x 1001^2 float32 master pattern is 8 MB, resident
//   in the 50 MB L2). At ~5 TB/s of L2 bandwidth the gathers are the bound:
//   ~2e7 patterns/s, i.e. 1e5 orientations of 60 x 60 patterns in ~5 ms.

#ifndef DPM_HOST_SHIM
#define DPM_DYNAMIC_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char dpm_dynamic_shared_[]; \
    T* name = reinterpret_cast<T*>(dpm_dynamic_shared_)
#endif

// Orientations per block; must equal _ORIENTATIONS_PER_BLOCK in dpm/projection.py.
#define DPM_PROJECT_TILE 4

// Spread threshold for a "constant" row: std <= 16 float32 ulps of the mean.
#define DPM_CONSTANT_RTOL (16.0 * 1.1920928955078125e-07)

#include "lambert.cuh"

// __launch_bounds__(256, 4): at most 256 threads and at least 4 resident blocks
// per SM. That caps registers at 64 (ptxas sm_90: 100 without the bound; 64 with
// it plus 80 B of L1-cached stack for the double sums) and doubles occupancy to
// 1024 threads per SM, which the latency-bound master-pattern gathers need more.
extern "C" __global__ void __launch_bounds__(256, 4) project_patterns(
    const float* __restrict__ northern,
    const float* __restrict__ southern,
    const int side,
    const float* __restrict__ vectors,
    const int npix,
    const float* __restrict__ quaternions,
    const int n,
    float* __restrict__ out)
{
    __shared__ float rot[DPM_PROJECT_TILE][9];     // row-major R(q) per orientation
    __shared__ float stats[DPM_PROJECT_TILE][2];   // mean, 1 / norm per orientation
    DPM_DYNAMIC_SHARED(double, partial);           // [2 * TILE][blockDim.x]

    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const int first = blockIdx.x * DPM_PROJECT_TILE;

    // One thread per orientation of the tile builds its rotation matrix once.
    if (tid < DPM_PROJECT_TILE) {
        float a = 1.0f, b = 0.0f, c = 0.0f, d = 0.0f;
        if (first + tid < n) {
            const float* q = quaternions + 4 * (first + tid);
            a = q[0];
            b = q[1];
            c = q[2];
            d = q[3];
        }
        const float s = 1.0f / (a * a + b * b + c * c + d * d);
        float* m = rot[tid];
        m[0] = (a * a + b * b - c * c - d * d) * s;
        m[1] = 2.0f * (b * c - a * d) * s;
        m[2] = 2.0f * (a * c + b * d) * s;
        m[3] = 2.0f * (a * d + b * c) * s;
        m[4] = (a * a - b * b + c * c - d * d) * s;
        m[5] = 2.0f * (c * d - a * b) * s;
        m[6] = 2.0f * (b * d - a * c) * s;
        m[7] = 2.0f * (a * b + c * d) * s;
        m[8] = (a * a - b * b - c * c + d * d) * s;
    }
    __syncthreads();

    // Pass 1: intensities, with per-thread sums of I and I^2 in double.
    double sum[DPM_PROJECT_TILE];
    double sum2[DPM_PROJECT_TILE];
    for (int k = 0; k < DPM_PROJECT_TILE; ++k) {
        sum[k] = 0.0;
        sum2[k] = 0.0;
    }
    for (int p = tid; p < npix; p += nthreads) {
        const float x = vectors[3 * p];
        const float y = vectors[3 * p + 1];
        const float z = vectors[3 * p + 2];
        for (int k = 0; k < DPM_PROJECT_TILE; ++k) {
            if (first + k >= n) break;
            const float* m = rot[k];
            const float xc = m[0] * x + m[1] * y + m[2] * z;
            const float yc = m[3] * x + m[4] * y + m[5] * z;
            const float zc = m[6] * x + m[7] * y + m[8] * z;
            float la, lb;
            dpm_vector_to_lambert(xc, yc, zc, &la, &lb);
            const float value = dpm_lambert_bilinear(zc >= 0.0f ? northern : southern, side, la, lb);
            out[(size_t)(first + k) * npix + p] = value;
            sum[k] += value;
            sum2[k] += (double)value * value;
        }
    }
    for (int k = 0; k < DPM_PROJECT_TILE; ++k) {
        partial[(2 * k) * nthreads + tid] = sum[k];
        partial[(2 * k + 1) * nthreads + tid] = sum2[k];
    }
    __syncthreads();

    // Tree reduction in shared memory (blockDim.x is a power of two).
    for (int stride = nthreads / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            for (int j = 0; j < 2 * DPM_PROJECT_TILE; ++j) {
                partial[j * nthreads + tid] += partial[j * nthreads + tid + stride];
            }
        }
        __syncthreads();
    }
    if (tid < DPM_PROJECT_TILE) {
        const double s = partial[(2 * tid) * nthreads];
        const double s2 = partial[(2 * tid + 1) * nthreads];
        const double mean = s / npix;
        const double var = fmax(s2 / npix - mean * mean, 0.0);
        const double tol = DPM_CONSTANT_RTOL * mean;
        stats[tid][0] = (float)mean;
        stats[tid][1] = var <= tol * tol ? 0.0f : (float)(1.0 / sqrt(var * npix));
    }
    __syncthreads();

    // Pass 2: zero mean, unit norm, in place (each thread rereads its own pixels).
    for (int p = tid; p < npix; p += nthreads) {
        for (int k = 0; k < DPM_PROJECT_TILE; ++k) {
            if (first + k >= n) break;
            float* o = out + (size_t)(first + k) * npix + p;
            *o = (*o - stats[k][0]) * stats[k][1];
        }
    }
}
