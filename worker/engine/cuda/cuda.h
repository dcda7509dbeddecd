/* cuda.h - the worker's GPUs and the CUDA backend (backend.h's op table on
 * one NVIDIA GPU). Declared in every build: a worker built without nvcc
 * (worker/engine/cuda/none.c) reports no GPUs and says why, so callers need
 * no #ifdef.
 *
 * Threading: a job runs on one thread on one GPU. cuda_backend_open binds
 * the calling thread to a device, a stream, a cuBLAS handle and a precision
 * (thread-local), and returns the table, whose ops then run on that
 * thread's context; several jobs on several threads each open their own.
 * Ops enqueue on the thread's stream; download (and everything that hands
 * results to the host) synchronises it. */
#ifndef STRATA_CUDA_H
#define STRATA_CUDA_H

#include "worker/engine/backend.h"

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* How matrix products compute. Everything else (norms, softmax, losses,
 * optimizer state, the residual stream) stays in fp32 in every mode. */
typedef enum {
    CUDA_FP32 = 0, /* fp32 operands, fp32 accumulation (no TF32) */
    CUDA_BF16,     /* bf16 operands, fp32 accumulation: the GPU default */
    CUDA_FP16,     /* fp16 operands, fp32 accumulation; training scales the loss */
} cuda_precision;

/* "fp32", "bf16", "fp16". */
const char *cuda_precision_name(cuda_precision p);
/* Parses those names; 0, or -1 with err naming the accepted values. */
int cuda_precision_parse(const char *name, cuda_precision *p, char *err, size_t errlen);

typedef struct {
    int index;             /* CUDA device ordinal */
    char name[96];         /* "NVIDIA H200" */
    double memory_gb;      /* total memory, GiB */
    int major, minor;      /* compute capability */
    int multiprocessors;
} cuda_device_info;

#define CUDA_MAX_DEVICES 64

/* Fills devs (up to max) with the GPUs this process can use and returns
 * their number. 0 means none, with why saying why in one line ("this
 * worker was built without CUDA (no nvcc at build time)", "no CUDA driver
 * found", "no GPU found"); -1 is never returned. Cheap after the first
 * call (the answer is cached). STRATA_GPUS=none hides every GPU;
 * CUDA_VISIBLE_DEVICES works as usual. */
int cuda_devices(cuda_device_info *devs, int max, char *why, size_t whylen);

/* Binds the calling thread to GPU device with matrix products in
 * precision, creating its stream and cuBLAS handle on first use, and
 * returns the CUDA backend table (name "cuda"). NULL with err set when the
 * device cannot be used. */
const backend *cuda_backend_open(int device, cuda_precision precision, char *err,
                                 size_t errlen);
/* Releases the calling thread's context (stream, handle, scratch and the
 * low-precision weight copies). Buffers from alloc must be freed first. */
void cuda_backend_close(void);

/* Tells the thread's backend that [w, w + n) (device memory) holds weights
 * that later matmuls read, so that in bf16/fp16 it keeps a low-precision
 * copy of them and converts them once instead of at every product. Call it
 * again after the weights change (an optimizer step) to refresh the copy;
 * cuda_backend_forget drops it. A no-op in fp32. Returns 0, or -1 with err
 * (out of memory: the copy is then not made, and products convert on the
 * fly, which is slower but correct). */
int cuda_backend_register_weights(const float *w, size_t n, char *err, size_t errlen);
void cuda_backend_forget_weights(const float *w);

/* Frozen weights: tensors that are read only by matmul (and by
 * matmul_backward for dx), never written, in bf16/fp16 contexts. They live
 * on the device ONLY in the context's low precision (2 bytes a weight, no
 * fp32 copy), which is what lets predict of a 7B model and LoRA training on
 * a 7B base fit (docs/gpu.md).
 *
 * cuda_backend_upload_frozen converts host[0, n) (fp32, host memory) into a
 * new low-precision device tensor, in chunks through a bounded fp32 staging
 * buffer (at most 32 MiB), so neither the host nor the device ever holds a
 * second full copy. *key is set to the tensor's key: the start of n floats
 * of host address space reserved with no access (it costs no memory), which
 * stands for the tensor wherever the engine wants a float pointer. matmul
 * and matmul_backward given a w inside [key, key + n) read the copy at the
 * same element offset, as they do for registered weights; every other op
 * given such a pointer is a programming error, and the GPU (or the host
 * with the emulator) faults on it. The key is valid until
 * cuda_backend_free_frozen(key) or cuda_backend_close. While a thread holds
 * frozen tensors, cuda_backend_open refuses to change its precision (there
 * is no fp32 source to convert again). Returns 0, or -1 with err set: the
 * context computes in fp32 (upload normally there), out of GPU memory
 * (err says "out of GPU memory"), no address space, a failed copy or
 * conversion; *key is then NULL and nothing is kept. */
int cuda_backend_upload_frozen(const float *host, size_t n, const float **key, char *err,
                               size_t errlen);
/* Frees the device copy of the frozen tensor whose key is key and releases
 * its address range. A pointer that is not a live key of the calling
 * thread (NULL, an ordinary device buffer) is ignored, so a caller may pass
 * any weight pointer. */
void cuda_backend_free_frozen(const float *key);
/* Whether the calling thread has an open context whose products are bf16
 * or fp16 (where frozen tensors can be uploaded). */
bool cuda_backend_low_precision(void);

/* Device bytes free and total on the thread's device (after open). */
int cuda_backend_memory(size_t *free_bytes, size_t *total_bytes, char *err, size_t errlen);

/* Waits for the thread's stream and reports any asynchronous kernel or
 * cuBLAS failure: 0, or -1 with err set. */
int cuda_backend_sync(char *err, size_t errlen);

/* The calling thread's CUDA stream (a cudaStream_t) for work queued beside
 * the backend's ops, such as the optimizer's kernels, so that it runs in
 * order with them; NULL when no backend is open on this thread. */
void *cuda_backend_stream(void);

#ifdef __cplusplus
}
#endif

#endif
