// host_shim.h: compile dpm's CUDA kernels for the CPU (g++ + OpenMP).
//
// Force-included when a kernels/*.cu file is compiled for the host:
//
//     g++ -x c++ -std=c++17 -O2 -fopenmp -fPIC -shared -include kernels/host_shim.h NAME.cu
//
// Execution model. A launch runs the grid block after block; the threads of one
// block run as one OpenMP team, one OpenMP thread per CUDA thread. So
//   * `__shared__` is `static`: a function-static array is shared by the team,
//     which is exactly block-shared storage (blocks never run at the same time);
//   * `__syncthreads()` is an OpenMP barrier over the team;
//   * `threadIdx`/`blockIdx` are thread_local, `blockDim`/`gridDim` global.
// Threads of a block really run concurrently, so a missing `__syncthreads()`
// shows up as a race. Blocks run one at a time, so races *between* blocks (on
// global memory without atomics) are not detected. Launches are serialised.
// Cost: every block start and every barrier wakes each thread of the block
// (several microseconds per thread on a 2-core machine), so tests launch tens
// of blocks, not thousands.
//
// Conventions for kernel authors (kernels/*.cu)
// ---------------------------------------------
// 1. Dynamic shared memory. Declare it with DPM_DYNAMIC_SHARED(T, name); and
//    define the CUDA side of the macro in the kernel file:
//
//        #ifndef DPM_HOST_SHIM
//        #define DPM_DYNAMIC_SHARED(T, name) \
//            extern __shared__ __align__(16) unsigned char dpm_dynamic_shared_[]; \
//            T* name = reinterpret_cast<T*>(dpm_dynamic_shared_)
//        #endif
//
//    (`extern __shared__ T name[]` also works on the GPU as long as each name is
//    used with one type per file.) On the host the macro gives a pointer to a
//    per-launch buffer of `shared_mem` bytes, filled with 0xFF bytes before each
//    block (NaN for floats, -1 for ints), because CUDA leaves shared memory
//    uninitialised. Never write `extern __shared__` directly: it does not
//    compile here.
// 2. No warp intrinsics (`__shfl_*`, `__ballot_sync`, `__any_sync`,
//    `__syncwarp`, ...) and no warp-synchronous code: OpenMP threads are not
//    warps, so they cannot be emulated faithfully. Use shared memory plus
//    `__syncthreads()`. Using one is a compile error on the host.
// 3. Kernels are `extern "C" __global__ void`; scalar parameters are the exact
//    types the launcher passes (int <- np.int32, float <- np.float32,
//    long long <- np.int64); pointer parameters are C-contiguous arrays of the
//    pointee's dtype.
// 4. `__syncthreads()` must be reached by every thread of the block (as CUDA
//    requires); on the host a divergent barrier deadlocks instead of silently
//    misbehaving.
#ifndef DPM_HOST_SHIM_H
#define DPM_HOST_SHIM_H

#define DPM_HOST_SHIM 1

#include <omp.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- qualifiers
// g++ understands __restrict__ natively; everything else maps to plain C++.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

// ------------------------------------------------------------- index types
struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

struct float2 { float x, y; };
struct float3 { float x, y, z; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace dpm_shim {
// Dynamic shared memory of the running launch (see DPM_DYNAMIC_SHARED).
inline void* dynamic_shared = nullptr;
}  // namespace dpm_shim

#define DPM_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::dpm_shim::dynamic_shared)

// ------------------------------------------------------------ synchronisation
inline void __syncthreads() { _Pragma("omp barrier") }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// --------------------------------------------------------------- math/intrinsics
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}

template <class T>
inline T __ldg(const T* p) { return *p; }

// CUDA's device-side min/max overloads (same-type and int/unsigned mixes).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ----------------------------------------------------------------- atomics
// Each returns the old value, as in CUDA.
template <class T>
inline T dpm_atomic_add(T* address, T value) {
    T old;
    _Pragma("omp atomic capture") { old = *address; *address += value; }
    return old;
}

inline float atomicAdd(float* address, float value) { return dpm_atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return dpm_atomic_add(address, value); }
inline int atomicAdd(int* address, int value) { return dpm_atomic_add(address, value); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
    return dpm_atomic_add(address, value);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    return dpm_atomic_add(address, value);
}

template <class T>
inline T atomicCAS(T* address, T compare, T value) {
    __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return compare;  // the old value, whether or not the swap happened
}

template <class T>
inline T atomicExch(T* address, T value) {
    return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}

template <class T, class Better>
inline T dpm_atomic_select(T* address, T value, Better better) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (better(value, old) &&
           !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}

inline int atomicMax(int* a, int v) {
    return dpm_atomic_select(a, v, [](int x, int y) { return x > y; });
}
inline int atomicMin(int* a, int v) {
    return dpm_atomic_select(a, v, [](int x, int y) { return x < y; });
}
inline unsigned int atomicMax(unsigned int* a, unsigned int v) {
    return dpm_atomic_select(a, v, [](unsigned int x, unsigned int y) { return x > y; });
}
inline unsigned int atomicMin(unsigned int* a, unsigned int v) {
    return dpm_atomic_select(a, v, [](unsigned int x, unsigned int y) { return x < y; });
}

// ------------------------------------------------- forbidden: warp intrinsics
// A compile error with a message, wherever the intrinsic is used.
#define DPM_NO_WARP_INTRINSIC(name)                                                     \
    ([] {                                                                               \
        static_assert(sizeof(int) == 0, name " is a warp intrinsic, which the host "   \
                      "shim cannot emulate: use shared memory and __syncthreads()");    \
        return 0;                                                                       \
    }())
#define __shfl_sync(...) DPM_NO_WARP_INTRINSIC("__shfl_sync")
#define __shfl_up_sync(...) DPM_NO_WARP_INTRINSIC("__shfl_up_sync")
#define __shfl_down_sync(...) DPM_NO_WARP_INTRINSIC("__shfl_down_sync")
#define __shfl_xor_sync(...) DPM_NO_WARP_INTRINSIC("__shfl_xor_sync")
#define __shfl(...) DPM_NO_WARP_INTRINSIC("__shfl")
#define __shfl_up(...) DPM_NO_WARP_INTRINSIC("__shfl_up")
#define __shfl_down(...) DPM_NO_WARP_INTRINSIC("__shfl_down")
#define __shfl_xor(...) DPM_NO_WARP_INTRINSIC("__shfl_xor")
#define __ballot_sync(...) DPM_NO_WARP_INTRINSIC("__ballot_sync")
#define __ballot(...) DPM_NO_WARP_INTRINSIC("__ballot")
#define __any_sync(...) DPM_NO_WARP_INTRINSIC("__any_sync")
#define __all_sync(...) DPM_NO_WARP_INTRINSIC("__all_sync")
#define __match_any_sync(...) DPM_NO_WARP_INTRINSIC("__match_any_sync")
#define __reduce_add_sync(...) DPM_NO_WARP_INTRINSIC("__reduce_add_sync")
#define __activemask(...) DPM_NO_WARP_INTRINSIC("__activemask")
#define __syncwarp(...) DPM_NO_WARP_INTRINSIC("__syncwarp")

// ---------------------------------------------------------- launch runtime
namespace dpm_shim {

inline std::mutex& launch_mutex() {
    static std::mutex mutex;
    return mutex;
}

// Run `body` (one CUDA thread's work) for every thread of every block.
// Returns 0, or the team size OpenMP gave when it is not the block size.
template <class Body>
int run_grid(dim3 grid, dim3 block, std::size_t shared_mem, const Body& body) {
    std::lock_guard<std::mutex> lock(launch_mutex());
    const int threads = static_cast<int>(block.x * block.y * block.z);
    std::vector<std::max_align_t> shared(
        (shared_mem + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
    gridDim = grid;
    blockDim = block;
    dynamic_shared = shared.data();
    omp_set_dynamic(0);
    int team = threads;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                std::memset(shared.data(), 0xFF, shared_mem);
#pragma omp parallel num_threads(threads)
                {
                    if (omp_get_num_threads() != threads) {
#pragma omp master
                        team = omp_get_num_threads();
                    } else {
                        const unsigned int t = static_cast<unsigned int>(omp_get_thread_num());
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        body();
                    }
                }
                if (team != threads) return team;
            }
    return 0;
}

// Call `kernel` with args[i] pointing at its i-th argument (cuLaunchKernel's
// kernelParams convention).
template <class... P, std::size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<P*>(args[I])...);
}

template <class... P>
int launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_mem, void** args) {
    return run_grid(grid, block, shared_mem,
                    [&] { call(kernel, args, std::index_sequence_for<P...>{}); });
}

// Byte size of each parameter, as the compiler sees them; returns the count.
template <class... P>
int parameter_sizes(void (*)(P...), std::size_t* sizes) {
    const std::size_t known[] = {sizeof(P)..., 0};
    for (std::size_t i = 0; i < sizeof...(P); ++i) sizes[i] = known[i];
    return static_cast<int>(sizeof...(P));
}

}  // namespace dpm_shim

#endif  // DPM_HOST_SHIM_H
