// Correlation sums of refinement: the value, gradient and Gauss-Newton matrix
// of the NCC between an experimental pattern and the pattern projected from a
// master pattern, for a batch of (pattern, orientation, pattern centre) items.
//
// Contract (shared with the numba twin dpm.refine._refine_sums_numba):
//   For item i with quaternion q_i (sample -> crystal, scalar first, R(q) its
//   active rotation matrix), Bruker pattern centre pc_i and experimental row
//   e = patterns[item_pattern[i], :] (zero mean, unit norm over the npix used
//   pixels), and for every used pixel p with centre (cx_p, ry_p) in pixels:
//     w   = x_d * S[0,:] + y_d * S[1,:] + z_d * S[2,:],
//           x_d = (cx - PCx * sx) / sy, y_d = PCy - ry / sy, z_d = PCz
//           (S: dpm.detector.sample_to_detector_matrix, row-major),
//     v   = w / |w| (sample frame), u = R(q_i) v (crystal frame),
//     I   = bilinear lookup of the master pattern at u (Lambert square of
//           the hemisphere holding u: northern when u_z >= 0),
//     g   = gradient of the interpolated master pattern at u:
//           dI/da grad(a) + dI/db grad(b), with (dI/da, dI/db) bilinearly
//           interpolated from the Lambert gradient maps and grad(a), grad(b)
//           the analytic gradients of the Lambert map (a, b)(u) (only the
//           part tangent to the sphere enters D; 0 at the pole),
//     D_0..2 = dI / d(delta_j) = (u x g)_j for a crystal-frame rotation
//           q -> exp(delta) q (u -> u + delta x u),
//     D_3..5 = dI / dPC_k = (R^T g) . dv/dPC_k when n_params == 6; with
//           n_params == 3 they are taken as 0 (not computed).
//   out[i, :] (float64, 42 values) = sum over p of
//     [I, I^2, e I, D_j (6), I D_j (6), e D_j (6), D_j D_k (21, j <= k, row-major)],
//   so with n_params == 3 every sum holding a D_3..5 is exactly 0.
//   dpm/refine.py turns them into the NCC, its gradient and J^T J.
//   n_params is 3 or 6 (any other value is treated as 6).
//   Camera PSF: with n_taps > 1, I and D are first evaluated on the whole
//   detector padded by r = (n_taps - 1) / 2 pixels (`pixels` then holds its
//   ngrid pixel centres, row-major), blurred by the separable Gaussian `taps`
//   (rows, then columns), and read at the used pixels `used` (flat indices
//   row * sx + col into the sy x sx detector image). With n_taps == 1,
//   `pixels` are the used pixels themselves (ngrid == npix).
//
// Layout: tables (2, side, side, 4) float32: hemisphere (north, south) x
//   Lambert row (b) x Lambert column (a) x channel (I, dI/da, dI/db, 0), so
//   the three channels of a grid node are one aligned 16-byte load;
//   S (9,) float32; pixels (ngrid, 2) float32 (cx, ry); patterns (n, npix)
//   float32; item_pattern (m,) int32; quaternions (m, 4) float32;
//   pcs (m, 3) float32; taps (n_taps,) float64; used (npix,) int32;
//   scratch (m * 7 * (ngrid + (ngrid / (sx + n_taps - 1)) * sx),) float32
//   (unused without a PSF); out (m, 42) float64. All C-contiguous.
//
// Launch geometry (set in dpm/refine.py, _refine_sums_cuda):
//   grid  = m blocks, block i owns item i (one refinement candidate);
//   block = B threads, B a power of two (128 for real patterns): thread t
//           walks pixels t, t + B, ... (coalesced loads of pixel centres and
//           of the experimental row), keeping its 42 partial sums in
//           registers (double: the NCC normalisation subtracts nearly equal
//           sums); then a shared-memory tree reduction (42 * B doubles of
//           dynamic shared memory: 43 KB at B = 128) and the threads write
//           the row's 42 sums (strided: B may be 32 for tiny patterns).
//
// Expected H100 cost per item of P pixels (P = 3600 for 60 x 60):
//   FLOPs ~200 per pixel (Lambert map with sqrt + atan and its analytic
//   gradient, 12-channel bilinear, PC derivatives, 42 FMAs into double sums;
//   about half of that with n_params == 3) -> ~0.7 MFLOP per
//   item; double adds run at half the fp32 rate on an H100, so ~30 TFLOP/s
//   effective -> ~4e7 items/s of arithmetic. Bytes: experimental row 4 B and
//   pixel centre 8 B per pixel from DRAM/L2 (43 KB per item); master gathers
//   4 x 16 B per pixel (~230 KB per item from the L2-resident 4 MB tables at
//   npx 250). The gathers bound it at ~2e7 items/s, so one refinement
//   iteration of a 1e6-pattern map takes ~50 ms.

#ifndef DPM_HOST_SHIM
#define DPM_DYNAMIC_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char dpm_dynamic_shared_[]; \
    T* name = reinterpret_cast<T*>(dpm_dynamic_shared_)
#endif

#include "lambert.cuh"

// Number of sums per item; must equal N_SUMS in dpm/refine.py.
#define REFINE_N_SUMS 42

// Square Lambert coordinates (a, b) of a unit vector on the hemisphere of
// sign s (+1 north, -1 south); continues smoothly a little past the equator,
// so forward differences of a point near it stay on one chart.
__device__ inline void refine_lambert(float x, float y, float z, float s, float* a, float* b)
{
    const float rr = x * x + y * y;
    if (rr == 0.0f) {
        *a = 0.0f;
        *b = 0.0f;
        return;
    }
    const float r = sqrtf(2.0f * rr / (1.0f + s * z));
    const float k = 0.9003163161571061f;  // 2 sqrt(2) / pi
    const float inv_sqrt2 = 0.7071067811865476f;
    if (fabsf(y) <= fabsf(x)) {
        const float q = x >= 0.0f ? r : -r;
        *a = q * inv_sqrt2;
        *b = q * k * atanf(y / x);
    } else {
        const float q = y >= 0.0f ? r : -r;
        *a = q * k * atanf(x / y);
        *b = q * inv_sqrt2;
    }
}

// Bilinear lookup of the three channels (I, dI/da, dI/db) of one hemisphere.
__device__ inline float4 refine_bilinear(const float4* __restrict__ table, int side, float a, float b)
{
    const DpmLambertCell cell = dpm_lambert_cell(side, a, b);
    const int r0 = cell.r0, c0 = cell.c0, r1 = cell.r1, c1 = cell.c1;
    const float dy = cell.dy, dx = cell.dx;
    const float w00 = (1.0f - dy) * (1.0f - dx);
    const float w10 = dy * (1.0f - dx);
    const float w01 = (1.0f - dy) * dx;
    const float w11 = dy * dx;
    const float4 t00 = table[r0 * side + c0];
    const float4 t10 = table[r1 * side + c0];
    const float4 t01 = table[r0 * side + c1];
    const float4 t11 = table[r1 * side + c1];
    return make_float4(w00 * t00.x + w10 * t10.x + w01 * t01.x + w11 * t11.x,
                       w00 * t00.y + w10 * t10.y + w01 * t01.y + w11 * t11.y,
                       w00 * t00.z + w10 * t10.z + w01 * t01.z + w11 * t11.z,
                       0.0f);
}

// Gradient ga grad(a) + gb grad(b) of I(a(u), b(u)) at unit u = (x, y, z) on
// the hemisphere of sign s, given its Lambert coordinates (a, b) (as
// dpm.refine._lambert_gradient). Both a and b are r = sqrt(2 (1 - s z)) times a
// function of the azimuth, so d/dz = (a, b) (dr/dz) / r with dr/dz = -s / r;
// the azimuthal parts are those of atan(y / x) (or atan(x / y)). Only the
// part tangent to the sphere enters D. Zero at the pole.
__device__ inline void refine_lambert_gradient(float x, float y, float z, float s, float a,
                                               float b, float ga, float gb, float* gx, float* gy,
                                               float* gz)
{
    const float rr = x * x + y * y;
    if (rr == 0.0f) {
        *gx = 0.0f;
        *gy = 0.0f;
        *gz = 0.0f;
        return;
    }
    const float r2 = 2.0f * rr / (1.0f + s * z);  // r^2
    const float k = 0.9003163161571061f;         // 2 sqrt(2) / pi
    *gz = -s * (ga * a + gb * b) / r2;
    if (fabsf(y) <= fabsf(x)) {
        // a = sg r / sqrt(2), b = sg r k atan(y / x): only b depends on the azimuth
        const float c = gb * (x >= 0.0f ? 1.0f : -1.0f) * sqrtf(r2) * k / rr;
        *gx = -c * y;
        *gy = c * x;
    } else {
        // a = sg r k atan(x / y), b = sg r / sqrt(2)
        const float c = ga * (y >= 0.0f ? 1.0f : -1.0f) * sqrtf(r2) * k / rr;
        *gx = c * y;
        *gy = -c * x;
    }
}

// Add one pixel to the 42 sums, for the first NP parameters (3 or 6); the
// loops unroll, so acc stays in registers.
template <int NP>
__device__ inline void refine_accumulate(double* acc, double value, double e, const float* D)
{
    acc[0] += value;
    acc[1] += value * value;
    acc[2] += e * value;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
        const double dj = (double)D[j];
        acc[3 + j] += dj;
        acc[9 + j] += value * dj;
        acc[15 + j] += e * dj;
        const int row = 21 + 6 * j - j * (j - 1) / 2;  // D_j D_j among the 42 sums
#pragma unroll
        for (int k = j; k < NP; ++k) {
            acc[row + k - j] += dj * (double)D[k];
        }
    }
}

// Intensity I and derivatives D_0..D_{NP-1} of one pixel (centre cx, ry) for
// an item with rotation r, PC (pcx, pcy, pcz) and dw/dPC dw (contract above).
struct RefineItem {
    float r00, r01, r02, r10, r11, r12, r20, r21, r22;
    float pcx, pcy, pcz, sx, sy;
    float dw[3][3];
};

__device__ inline float refine_pixel(const RefineItem& it, const float* __restrict__ S,
                                     const float4* __restrict__ north,
                                     const float4* __restrict__ south, int side, float cx,
                                     float ry, bool with_pc, float* D)
{
    const float xd = (cx - it.pcx * it.sx) / it.sy;
    const float yd = it.pcy - ry / it.sy;
    const float wx = xd * S[0] + yd * S[3] + it.pcz * S[6];
    const float wy = xd * S[1] + yd * S[4] + it.pcz * S[7];
    const float wz = xd * S[2] + yd * S[5] + it.pcz * S[8];
    const float wn = sqrtf(wx * wx + wy * wy + wz * wz);
    const float vx = wx / wn, vy = wy / wn, vz = wz / wn;
    const float ux = it.r00 * vx + it.r01 * vy + it.r02 * vz;
    const float uy = it.r10 * vx + it.r11 * vy + it.r12 * vz;
    const float uz = it.r20 * vx + it.r21 * vy + it.r22 * vz;
    const float s = uz >= 0.0f ? 1.0f : -1.0f;
    float a, b;
    refine_lambert(ux, uy, uz, s, &a, &b);
    const float4 t = refine_bilinear(s > 0.0f ? north : south, side, a, b);
    float gx, gy, gz;
    refine_lambert_gradient(ux, uy, uz, s, a, b, t.y, t.z, &gx, &gy, &gz);
    D[0] = uy * gz - uz * gy;
    D[1] = uz * gx - ux * gz;
    D[2] = ux * gy - uy * gx;
    if (with_pc) {
        // Gradient in the sample frame: R^T g.
        const float gsx = it.r00 * gx + it.r10 * gy + it.r20 * gz;
        const float gsy = it.r01 * gx + it.r11 * gy + it.r21 * gz;
        const float gsz = it.r02 * gx + it.r12 * gy + it.r22 * gz;
        const float gv = gsx * vx + gsy * vy + gsz * vz;
        for (int k = 0; k < 3; ++k) {
            const float gdw = gsx * it.dw[k][0] + gsy * it.dw[k][1] + gsz * it.dw[k][2];
            const float vdw = vx * it.dw[k][0] + vy * it.dw[k][1] + vz * it.dw[k][2];
            D[3 + k] = (gdw - gv * vdw) / wn;
        }
    }
    return t.x;
}

extern "C" __global__ void __launch_bounds__(256) refine_sums(
    const float* __restrict__ tables,
    const int side,
    const float* __restrict__ S,
    const float* __restrict__ pixels,
    const int ngrid,
    const float sx,
    const float sy,
    const float* __restrict__ patterns,
    const int* __restrict__ item_pattern,
    const float* __restrict__ quaternions,
    const float* __restrict__ pcs,
    const int m,
    const int n_params,
    const double* __restrict__ taps,
    const int n_taps,
    const int* __restrict__ used,
    const int npix,
    float* __restrict__ scratch,
    double* __restrict__ out)
{
    DPM_DYNAMIC_SHARED(double, partial);  // [REFINE_N_SUMS][blockDim.x]
    const int item = blockIdx.x;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    if (item >= m) {
        return;  // whole block leaves together: no barrier is skipped by part of it
    }

    RefineItem it;
    const float* q = quaternions + 4 * item;
    const float qa = q[0], qb = q[1], qc = q[2], qd = q[3];
    const float qs = 1.0f / (qa * qa + qb * qb + qc * qc + qd * qd);
    it.r00 = (qa * qa + qb * qb - qc * qc - qd * qd) * qs;
    it.r01 = 2.0f * (qb * qc - qa * qd) * qs;
    it.r02 = 2.0f * (qa * qc + qb * qd) * qs;
    it.r10 = 2.0f * (qa * qd + qb * qc) * qs;
    it.r11 = (qa * qa - qb * qb + qc * qc - qd * qd) * qs;
    it.r12 = 2.0f * (qc * qd - qa * qb) * qs;
    it.r20 = 2.0f * (qb * qd - qa * qc) * qs;
    it.r21 = 2.0f * (qa * qb + qc * qd) * qs;
    it.r22 = (qa * qa - qb * qb - qc * qc + qd * qd) * qs;
    it.pcx = pcs[3 * item];
    it.pcy = pcs[3 * item + 1];
    it.pcz = pcs[3 * item + 2];
    it.sx = sx;
    it.sy = sy;
    // dw/dPC_k: -(sx/sy) S[0,:], S[1,:], S[2,:].
    const float ratio = sx / sy;
    for (int k = 0; k < 3; ++k) {
        it.dw[0][k] = -ratio * S[k];
        it.dw[1][k] = S[3 + k];
        it.dw[2][k] = S[6 + k];
    }
    const float* e_row = patterns + (size_t)item_pattern[item] * npix;
    const float4* north = reinterpret_cast<const float4*>(tables);
    const float4* south = north + (size_t)side * side;
    const bool with_pc = n_params != 3;
    const int np = with_pc ? 6 : 3;

    double acc[REFINE_N_SUMS];
    for (int j = 0; j < REFINE_N_SUMS; ++j) {
        acc[j] = 0.0;
    }
    float D[6] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int radius = (n_taps - 1) / 2;
    if (radius == 0) {
        // No PSF: the pixels are the used ones; one pass.
        for (int p = tid; p < npix; p += nthreads) {
            const double value = (double)refine_pixel(it, S, north, south, side, pixels[2 * p],
                                                      pixels[2 * p + 1], with_pc, D);
            const double e = (double)e_row[p];
            if (with_pc) {
                refine_accumulate<6>(acc, value, e, D);
            } else {
                refine_accumulate<3>(acc, value, e, D);
            }
        }
    } else {
        // PSF: I and D on the detector padded by `radius` (grid_height x
        // grid_width pixels), then the separable Gaussian: rows into
        // row_pass (grid_height x width), then columns at the used pixels.
        // The images live in this item's slice of `scratch`, channel-major
        // (1 + np channels), so every pass reads and writes consecutive
        // addresses across the block's threads (coalesced; ~230 KB per item
        // at 60 x 60 stays in L2 between the passes).
        const int width = (int)sx;
        const int grid_width = width + 2 * radius;
        const int grid_height = ngrid / grid_width;
        const int channels = 1 + np;
        float* grid = scratch + (size_t)item * 7 * (ngrid + grid_height * width);
        float* row_pass = grid + (size_t)7 * ngrid;
        for (int p = tid; p < ngrid; p += nthreads) {
            grid[p] = refine_pixel(it, S, north, south, side, pixels[2 * p], pixels[2 * p + 1],
                                   with_pc, D);
            for (int c = 1; c < channels; ++c) {
                grid[(size_t)c * ngrid + p] = D[c - 1];
            }
        }
        __syncthreads();
        const int plane = grid_height * width;
        for (int idx = tid; idx < channels * plane; idx += nthreads) {
            const int c = idx / plane;
            const int rem = idx - c * plane;
            const int y = rem / width;
            const int x = rem - y * width;
            const float* src = grid + (size_t)c * ngrid + y * grid_width + x;
            double t = 0.0;
            for (int k = 0; k < n_taps; ++k) {
                t += taps[k] * (double)src[k];
            }
            row_pass[idx] = (float)t;
        }
        __syncthreads();
        for (int p = tid; p < npix; p += nthreads) {
            double blurred[7];
            for (int c = 0; c < channels; ++c) {
                const float* src = row_pass + (size_t)c * plane + used[p];
                double t = 0.0;
                for (int k = 0; k < n_taps; ++k) {
                    t += taps[k] * (double)src[k * width];
                }
                blurred[c] = t;
            }
            for (int c = 0; c < np; ++c) {
                D[c] = (float)blurred[1 + c];
            }
            const double e = (double)e_row[p];
            if (with_pc) {
                refine_accumulate<6>(acc, blurred[0], e, D);
            } else {
                refine_accumulate<3>(acc, blurred[0], e, D);
            }
        }
    }
    for (int j = 0; j < REFINE_N_SUMS; ++j) {
        partial[j * nthreads + tid] = acc[j];
    }
    __syncthreads();
    // Tree reduction in shared memory (blockDim.x is a power of two).
    for (int stride = nthreads / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            for (int j = 0; j < REFINE_N_SUMS; ++j) {
                partial[j * nthreads + tid] += partial[j * nthreads + tid + stride];
            }
        }
        __syncthreads();
    }
    // Strided: a block may have fewer threads (32) than there are sums (42).
    for (int j = tid; j < REFINE_N_SUMS; j += nthreads) {
        out[(size_t)item * REFINE_N_SUMS + j] = partial[j * nthreads];
    }
}
