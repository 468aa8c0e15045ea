// Lambert projection helpers shared by kernels/project.cu, fused_match.cu and refine.cu.
// A RawModule compiles one source: dpm.backend.kernel_source pastes this file in place
// of its #include line (nvcc and the host shim see the same text).
// Twins of dpm.projection's numba helpers (vector_to_lambert_scalar, lambert_cell).

#ifndef DPM_LAMBERT_CUH
#define DPM_LAMBERT_CUH

// Square Lambert coordinates (a, b) in [-1, 1]^2 of a unit vector (Rosca 2010),
// hemisphere chosen by the caller from sign(z).
__device__ inline void dpm_vector_to_lambert(float x, float y, float z, float* a, float* b)
{
    const float sqrt_pi = 1.7724538509055160f;
    const float inv_sqrt_half_pi = 0.7978845608028654f;  // 1 / sqrt(pi / 2)
    if (x == 0.0f && y == 0.0f) {
        *a = 0.0f;
        *b = 0.0f;
        return;
    }
    // 1 - |z| = (x^2 + y^2) / (1 + |z|) for a unit vector; the right-hand side
    // keeps float32 precision near the poles, where 1 - |z| cancels.
    const float r = sqrtf(2.0f * (x * x + y * y) / (1.0f + fabsf(z)));
    float X, Y;
    if (fabsf(y) <= fabsf(x)) {
        const float q = x >= 0.0f ? r : -r;
        X = q * (0.5f * sqrt_pi);
        Y = q * (2.0f / sqrt_pi) * atanf(y / x);
    } else {
        const float q = y >= 0.0f ? r : -r;
        X = q * (2.0f / sqrt_pi) * atanf(x / y);
        Y = q * (0.5f * sqrt_pi);
    }
    *a = X * inv_sqrt_half_pi;
    *b = Y * inv_sqrt_half_pi;
}

// The cell of a (2 npx + 1)^2 hemisphere that holds Lambert (a, b): corner rows r0, r1,
// columns c0, c1 (clamped to the edge) and the fractions dy, dx (kikuchipy/EMsoft).
struct DpmLambertCell {
    int r0, c0, r1, c1;
    float dy, dx;
};

__device__ inline DpmLambertCell dpm_lambert_cell(int side, float a, float b)
{
    const float npx = 0.5f * (float)(side - 1);
    const float last = (float)(side - 1);
    const float xp = fminf(fmaxf(npx * a + npx, 0.0f), last);
    const float yp = fminf(fmaxf(npx * b + npx, 0.0f), last);
    DpmLambertCell cell;
    cell.c0 = (int)xp;
    cell.r0 = (int)yp;
    cell.c1 = cell.c0 + 1 < side ? cell.c0 + 1 : cell.c0;
    cell.r1 = cell.r0 + 1 < side ? cell.r0 + 1 : cell.r0;
    cell.dx = xp - (float)cell.c0;
    cell.dy = yp - (float)cell.r0;
    return cell;
}

// Bilinear interpolation of one hemisphere at Lambert (a, b).
__device__ inline float dpm_lambert_bilinear(const float* __restrict__ mp, int side, float a, float b)
{
    const DpmLambertCell c = dpm_lambert_cell(side, a, b);
    return __ldg(mp + c.r0 * side + c.c0) * (1.0f - c.dy) * (1.0f - c.dx)
         + __ldg(mp + c.r1 * side + c.c0) * c.dy * (1.0f - c.dx)
         + __ldg(mp + c.r0 * side + c.c1) * (1.0f - c.dy) * c.dx
         + __ldg(mp + c.r1 * side + c.c1) * c.dy * c.dx;
}

#endif  // DPM_LAMBERT_CUH
