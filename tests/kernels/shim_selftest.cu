// Self-test kernels for kernels/host_shim.h: each exercises one part of the CUDA
// execution model the shim emulates. Compiled for the host by
// tests/test_hostcuda.py and for sm_90/sm_80 by tests/test_nvcc.py.

#ifndef DPM_HOST_SHIM
#define DPM_DYNAMIC_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char dpm_dynamic_shared_[]; \
    T* name = reinterpret_cast<T*>(dpm_dynamic_shared_)
#endif

#define REDUCE_THREADS 256

// One partial sum per block: a tree reduction in static shared memory.
// blockDim.x must be REDUCE_THREADS.
extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ sums,
                                     int n) {
    __shared__ float partial[REDUCE_THREADS];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}

// Reverse each block's slice of x through dynamic shared memory
// (shared_mem = blockDim.x * sizeof(int)); n must be a multiple of blockDim.x.
extern "C" __global__ void reverse_blocks(const int* __restrict__ x, int* __restrict__ y) {
    DPM_DYNAMIC_SHARED(int, tile);
    const int offset = blockIdx.x * blockDim.x;
    tile[threadIdx.x] = x[offset + threadIdx.x];
    __syncthreads();
    y[offset + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// out[row, col] = row * 1000 + col on a (rows, cols) array, with a 2-D grid
// of 2-D blocks; also records each thread's flattened in-block index.
extern "C" __global__ void index_2d(int* __restrict__ out, int* __restrict__ thread_rank,
                                    int rows, int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row < rows && col < cols) {
        out[row * cols + col] = row * 1000 + col;
        thread_rank[row * cols + col] = threadIdx.y * blockDim.x + threadIdx.x;
    }
}

// Global histogram of labels in [0, bins) plus a float total and an int maximum,
// all through atomics.
extern "C" __global__ void atomic_histogram(const int* __restrict__ labels,
                                            const float* __restrict__ weights, int n,
                                            unsigned int* __restrict__ counts,
                                            float* __restrict__ total,
                                            int* __restrict__ largest) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(&counts[labels[i]], 1u);
    atomicAdd(total, weights[i]);
    atomicMax(largest, labels[i]);
}
