/* emu.h - the CUDA subset of worker/engine/cuda/compat.cuh, emulated on the
 * CPU so that strata's kernels and CUDA backend run in tests on machines
 * without a GPU. Included by compat.cuh when STRATA_CUDA_EMU is defined;
 * C++17 only (g++ -x c++). tests/cuda_emu/README.md says what it checks and
 * what it cannot.
 *
 * Model: CU_LAUNCH runs the grid synchronously on the calling OS thread,
 * one block after another (by default x fastest, then y, then z; see
 * schedule_kind for the other orders); a block's threads are
 * cooperative fibers on their own stacks, so __syncthreads and warp
 * shuffles really wait for the other threads. threadIdx and friends are
 * thread-local variables that the scheduler sets to the running fiber's
 * values before it switches to it. Launches a GPU would refuse (zero or
 * oversized dimensions, too much dynamic shared memory), divergent
 * barriers, shuffles with exited lanes and deadlocks abort the process with
 * a message naming the kernel. */
#ifndef STRATA_CUDA_EMU_H
#define STRATA_CUDA_EMU_H

#ifndef __cplusplus
#error "tests/cuda_emu/emu.h is C++: compile .cu files with g++ -x c++ -DSTRATA_CUDA_EMU"
#endif

#include "tests/cuda_emu/half_bits.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

/* --- qualifiers ------------------------------------------------------------ */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
/* One copy per kernel (per template instance) and OS thread: blocks run one
 * at a time, so a block sees it as its own. Unlike a GPU's, it keeps the
 * previous block's values (README: not caught). */
#define __shared__ static thread_local

/* --- index types and built-in variables ------------------------------------ */
struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
static constexpr int warpSize = 32;

/* --- cudart subset --------------------------------------------------------- */
typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
} cudaError_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01

struct CUstream_st;
typedef struct CUstream_st *cudaStream_t;

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int regsPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    size_t totalConstMem;
    int major;
    int minor;
    int multiProcessorCount;
    int l2CacheSize;
    int maxThreadsPerMultiProcessor;
    size_t sharedMemPerBlockOptin;
    size_t sharedMemPerMultiprocessor;
    int pciBusID;
    int pciDeviceID;
    int pciDomainID;
};

extern "C" {
cudaError_t cudaMalloc(void **ptr, size_t size);
cudaError_t cudaFree(void *ptr);
cudaError_t cudaMallocHost(void **ptr, size_t size);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaMemset(void *dst, int value, size_t count);
cudaError_t cudaMemsetAsync(void *dst, int value, size_t count, cudaStream_t stream);
cudaError_t cudaStreamCreate(cudaStream_t *stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t error);
const char *cudaGetErrorName(cudaError_t error);
cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaRuntimeGetVersion(int *version);
}

/* The C++ conveniences cuda_runtime.h has: the stream argument defaults to
 * the legacy stream, and a kernel is passed to cudaFuncSetAttribute as it
 * is. */
static inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count,
                                          enum cudaMemcpyKind kind)
{
    return cudaMemcpyAsync(dst, src, count, kind, (cudaStream_t)0);
}
static inline cudaError_t cudaMemsetAsync(void *dst, int value, size_t count)
{
    return cudaMemsetAsync(dst, value, count, (cudaStream_t)0);
}
template <class T>
static inline cudaError_t cudaFuncSetAttribute(T *func, enum cudaFuncAttribute attr, int value)
{
    return cudaFuncSetAttribute(reinterpret_cast<const void *>(func), attr, value);
}
template <class T> static inline cudaError_t cudaMalloc(T **ptr, size_t size)
{
    return cudaMalloc(reinterpret_cast<void **>(ptr), size);
}
template <class T> static inline cudaError_t cudaMallocHost(T **ptr, size_t size)
{
    return cudaMallocHost(reinterpret_cast<void **>(ptr), size);
}

/* --- 16-bit floats ---------------------------------------------------------- */
struct __nv_bfloat16 {
    uint16_t bits_;
};
struct __half {
    uint16_t bits_;
};
typedef struct __nv_bfloat16 nv_bfloat16;

static inline __nv_bfloat16 __float2bfloat16(float f)
{
    return __nv_bfloat16{half_bits_bf16_from_f32(f)};
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
static inline float __bfloat162float(__nv_bfloat16 h) { return half_bits_bf16_to_f32(h.bits_); }
static inline __half __float2half(float f) { return __half{half_bits_f16_from_f32(f)}; }
static inline __half __float2half_rn(float f) { return __float2half(f); }
static inline float __half2float(__half h) { return half_bits_f16_to_f32(h.bits_); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits_; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
static inline unsigned short __half_as_ushort(__half h) { return h.bits_; }
static inline __half __ushort_as_half(unsigned short u) { return __half{u}; }

/* --- device maths ----------------------------------------------------------- */
/* glibc declares (but does not export) __expf and __logf of its own, so the
 * CUDA names are macros for emulator functions. */
static inline float strata_emu_expf(float x) { return expf(x); }
static inline float strata_emu_logf(float x) { return logf(x); }
#define __expf strata_emu_expf
#define __logf strata_emu_logf
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <class T> static inline T __ldg(const T *p) { return *p; }

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b)
{
    return a < b ? a : b;
}
static inline unsigned long long max(unsigned long long a, unsigned long long b)
{
    return a > b ? a : b;
}
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

/* --- atomics: fibers share one OS thread, so a plain read-modify-write is
 * atomic with respect to every other emulated thread. ------------------------ */
static inline float atomicAdd(float *p, float v)
{
    float old = *p;
    *p = old + v;
    return old;
}
static inline double atomicAdd(double *p, double v)
{
    double old = *p;
    *p = old + v;
    return old;
}
static inline int atomicAdd(int *p, int v)
{
    int old = *p;
    /* wraps as the hardware does, without signed-overflow UB */
    *p = (int)((unsigned)old + (unsigned)v);
    return old;
}
static inline unsigned atomicAdd(unsigned *p, unsigned v)
{
    unsigned old = *p;
    *p = old + v;
    return old;
}
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v)
{
    unsigned long long old = *p;
    *p = old + v;
    return old;
}

/* --- the emulator's runtime (emu.cc) ---------------------------------------- */
namespace strata_emu {

enum warp_op { WARP_SHFL_XOR = 1, WARP_SHFL_DOWN, WARP_SYNC };

/* One launch: the kernel's name (for messages) and a type-erased call of the
 * kernel with the launch's arguments. */
struct launch_desc {
    const char *name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    void (*call)(void *ctx);
    void *ctx;
};

void launch(const launch_desc &d);

/* The order in which the emulator runs blocks and, at every scheduling point
 * (the start of a block, each barrier and warp-operation release), a block's
 * ready threads: forward (index order, the default), reverse, or shuffle (a
 * pseudo-random order drawn from a seed). Read once per process from
 * STRATA_EMU_SCHEDULE and STRATA_EMU_SEED, at the first launch; an unknown
 * value aborts. README.md: what each order catches. */
enum schedule_kind { SCHEDULE_FORWARD, SCHEDULE_REVERSE, SCHEDULE_SHUFFLE };
/* The schedule in force (and its seed in *seed when seed is not null). */
schedule_kind schedule_get(uint64_t *seed);
/* For tests: replaces the schedule for the launches that follow. */
void schedule_set(schedule_kind kind, uint64_t seed);
/* For tests: reads the environment again (aborting on an unknown value). */
void schedule_reload();
/* "forward", "reverse" or "shuffle"; false for anything else. */
bool schedule_parse(const char *name, schedule_kind *kind);
const char *schedule_name(schedule_kind kind);
/* Each emulated thread's stack size (an overflow faults). */
size_t fiber_stack_bytes();
/* The running block's dynamic shared memory (poisoned with 0xFF bytes at the
 * start of every block). */
unsigned char *dyn_smem();
void syncthreads(const char *file, int line);
uint64_t warp_exchange(unsigned mask, warp_op op, int arg, int width, uint64_t value);

template <class Fn, class Tuple> struct launch_call {
    Fn fn;
    Tuple args;
    static void run(void *ctx)
    {
        launch_call *self = static_cast<launch_call *>(ctx);
        std::apply(self->fn, self->args);
    }
};

/* Evaluates the arguments once (as a GPU launch does), then runs fn over
 * the grid; each thread gets its own copy of them. */
template <class Fn, class... Args>
void launch_args(const char *name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Fn fn,
                 Args &&...args)
{
    typedef std::tuple<typename std::decay<Args>::type...> tuple_type;
    launch_call<Fn, tuple_type> c{fn, tuple_type(std::forward<Args>(args)...)};
    launch_desc d{name, grid, block, smem, stream, &launch_call<Fn, tuple_type>::run, &c};
    launch(d);
}

template <class T> static inline uint64_t to_bits(T v)
{
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled type too wide");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    return u;
}
template <class T> static inline T from_bits(uint64_t u)
{
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}
template <class T> static inline T shfl(unsigned mask, T v, warp_op op, int arg, int width)
{
    return from_bits<T>(warp_exchange(mask, op, arg, width, to_bits(v)));
}

} /* namespace strata_emu */

/* A macro, so that the emulator knows each barrier's place in the source:
 * threads waiting at different places are a barrier in divergent code
 * (undefined on a GPU), which it reports. Source places, unlike return
 * addresses, survive the compiler duplicating a call. */
#define __syncthreads() ::strata_emu::syncthreads(__FILE__, __LINE__)
static inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    strata_emu::warp_exchange(mask, strata_emu::WARP_SYNC, 0, 32, 0);
}

#define STRATA_EMU_SHFL(T)                                                            \
    static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) \
    {                                                                                 \
        return strata_emu::shfl(mask, v, strata_emu::WARP_SHFL_XOR, lane_mask, width);  \
    }                                                                                 \
    static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) \
    {                                                                                 \
        return strata_emu::shfl(mask, v, strata_emu::WARP_SHFL_DOWN, (int)delta, width); \
    }
STRATA_EMU_SHFL(int)
STRATA_EMU_SHFL(unsigned)
STRATA_EMU_SHFL(long)
STRATA_EMU_SHFL(unsigned long)
STRATA_EMU_SHFL(long long)
STRATA_EMU_SHFL(unsigned long long)
STRATA_EMU_SHFL(float)
STRATA_EMU_SHFL(double)
#undef STRATA_EMU_SHFL

/* --- launches ---------------------------------------------------------------- */
/* CU_LAUNCH(kernel, grid, block, smem_bytes, stream, args...). A kernel name
 * with template arguments goes in parentheses: CU_LAUNCH((k<float, 4>), ...). */
#define CU_LAUNCH(kernel, grid, block, smem, stream, ...)                                      \
    ::strata_emu::launch_args(                                                                 \
        #kernel, dim3(grid), dim3(block), (size_t)(smem), (cudaStream_t)(stream),              \
        [](auto... strata_emu_a) { kernel(strata_emu_a...); }, ##__VA_ARGS__)

/* Dynamic shared memory as a typed pointer named name. */
#define CU_DYN_SMEM(type, name) type *name = reinterpret_cast<type *>(::strata_emu::dyn_smem())

#endif
