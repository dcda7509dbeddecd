/* emu.cc - the runtime of the CUDA emulator (emu.h): the fiber scheduler
 * that runs a launch's blocks, barriers and warp shuffles, and the cudart
 * subset (device memory, streams, device queries, errors).
 *
 * Blocks run one after another on the launching OS thread. A block's
 * threads are fibers (own stacks, switched by strata_emu_switch) that live
 * in a per-OS-thread pool and are reused across blocks and launches: each
 * runs a loop "call the current launch's kernel for my thread, mark myself
 * done, yield". The scheduler runs ready fibers until they block or
 * finish, releases whatever can be released (a warp whose live lanes all
 * wait in the same warp operation; the whole block when every live thread
 * waits at a barrier), and reports a deadlock when nothing can be. The
 * order of blocks and of ready fibers is the schedule's
 * (STRATA_EMU_SCHEDULE: run_rounds for forward, run_by_warps for reverse
 * and shuffle). */
#include "tests/cuda_emu/emu.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define STRATA_EMU_ASAN 1
#endif

/* Switching stacks. On x86-64 a few instructions save the callee-saved
 * registers (and the SSE/x87 control words) on the old stack and restore
 * them from the new one: a switch costs nanoseconds, where swapcontext
 * makes a signal-mask system call each time (about a microsecond, which
 * barrier-heavy kernels pay millions of times). Elsewhere ucontext does it.
 *
 * strata_emu_switch(save, to): stores the current stack pointer in *save
 * and continues on the stack whose saved pointer is to. */
#if defined(__x86_64__) && !defined(STRATA_EMU_UCONTEXT) /* the latter: test the fallback */
#define STRATA_EMU_ASM_SWITCH 1
extern "C" void strata_emu_switch(void **save, void *to) noexcept;
__asm__(".text\n"
        ".globl strata_emu_switch\n"
        ".hidden strata_emu_switch\n"
        ".type strata_emu_switch, @function\n"
        "strata_emu_switch:\n"
        "    pushq %rbp\n"
        "    pushq %rbx\n"
        "    pushq %r12\n"
        "    pushq %r13\n"
        "    pushq %r14\n"
        "    pushq %r15\n"
        "    subq $8, %rsp\n"
        "    stmxcsr (%rsp)\n"
        "    fnstcw 4(%rsp)\n"
        "    movq %rsp, (%rdi)\n"
        "    movq %rsi, %rsp\n"
        "    ldmxcsr (%rsp)\n"
        "    fldcw 4(%rsp)\n"
        "    addq $8, %rsp\n"
        "    popq %r15\n"
        "    popq %r14\n"
        "    popq %r13\n"
        "    popq %r12\n"
        "    popq %rbx\n"
        "    popq %rbp\n"
        "    ret\n"
        ".size strata_emu_switch, .-strata_emu_switch\n");
#else
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace strata_emu {
namespace {

constexpr unsigned k_max_threads = 1024;
constexpr size_t k_default_smem = 48 * 1024;
constexpr size_t k_max_smem = 232448; /* sm_90 opt-in maximum, 227 KiB */
constexpr unsigned long long k_default_memory = 8ull << 30;
#ifdef STRATA_EMU_ASAN
constexpr size_t k_stack_bytes = 512 * 1024; /* ASan frames are large */
#else
constexpr size_t k_stack_bytes = 128 * 1024;
#endif
constexpr size_t k_stack_guard = 256 * 1024;

/* Prints the message and aborts: for what a GPU would refuse or hang on. */
[[noreturn]] __attribute__((format(printf, 1, 2))) void emu_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("strata cuda emulator: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stderr);
    abort();
}

enum fiber_state { F_READY, F_WAIT_BAR, F_WAIT_WARP, F_DONE };

struct fiber {
#ifdef STRATA_EMU_ASM_SWITCH
    void *sp;
#else
    ucontext_t ctx;
#endif
    unsigned char *stack; /* usable part, above the guard */
    size_t stack_size;
    bool started;
    fiber_state state;
    uint3 tid;
    const char *bar_file;
    int bar_line;
    warp_op wop;
    int warg;
    uint64_t wval;
    uint64_t wresult;
#ifdef STRATA_EMU_ASAN
    void *fake_stack;
#endif
};

/* Per OS thread: the fiber pool and the launch being run. */
struct emu_thread {
    std::vector<fiber *> pool;
#ifdef STRATA_EMU_ASM_SWITCH
    void *sched_sp = nullptr;
#else
    ucontext_t sched_ctx;
#endif
    fiber *current = nullptr;
    const launch_desc *launch = nullptr;
    unsigned char *smem = nullptr;
    /* The running launch's schedule, its random stream (shuffle), and
     * reverse's and shuffle's thread order (order_draw). */
    schedule_kind sched = SCHEDULE_FORWARD;
    uint64_t rng = 0;
    std::vector<unsigned> order, warp_pos, warp_seq;
#ifdef STRATA_EMU_ASAN
    const void *sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    void *sched_fake_stack = nullptr;
#endif
    ~emu_thread();
};

thread_local emu_thread t_emu;

/* At the OS thread's exit the pooled fibers, all parked in fiber_main
 * between turns, are simply dropped with their stacks. */
emu_thread::~emu_thread()
{
    for (fiber *f : pool) {
        munmap(f->stack - k_stack_guard, f->stack_size + k_stack_guard);
        delete f;
    }
}

void fiber_main();

/* A fiber with a stack of k_stack_bytes above k_stack_guard PROT_NONE
 * bytes, so a kernel that overflows its stack faults instead of writing
 * over the next fiber's stack (the guard is wide because g++ does not
 * probe large frames page by page). */
fiber *fiber_new()
{
    size_t guard = k_stack_guard;
    void *mem = mmap(nullptr, k_stack_bytes + guard, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        emu_die("cannot map a %zu-byte fiber stack: %s", k_stack_bytes, strerror(errno));
    if (mprotect(mem, guard, PROT_NONE) != 0)
        emu_die("cannot protect a fiber stack guard page: %s", strerror(errno));
    fiber *f = new fiber();
    f->stack = static_cast<unsigned char *>(mem) + guard;
    f->stack_size = k_stack_bytes;
    f->started = false;
    f->state = F_DONE;
#ifdef STRATA_EMU_ASM_SWITCH
    /* The frame strata_emu_switch pops, from the saved pointer up: control
     * words, r15 r14 r13 r12 rbx rbp (zero: stack traces end here), the
     * address it returns to (fiber_main), and a null return address for
     * fiber_main, which never returns; that slot sits 8 bytes below a
     * 16-byte boundary, as at any function's entry. */
    uintptr_t top = ((uintptr_t)f->stack + f->stack_size) & ~(uintptr_t)15;
    uint64_t *frame = reinterpret_cast<uint64_t *>(top - 72);
    uint32_t control[2] = {0x1f80u, 0x037fu}; /* MXCSR and x87 control word defaults */
    memcpy(&frame[0], control, sizeof control);
    for (int i = 1; i <= 6; i++)
        frame[i] = 0;
    frame[7] = (uint64_t)(uintptr_t)&fiber_main;
    frame[8] = 0;
    f->sp = frame;
#else
    if (getcontext(&f->ctx) != 0)
        emu_die("getcontext failed: %s", strerror(errno));
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = f->stack_size;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, fiber_main, 0);
#endif
    return f;
}

/* Scheduler -> fiber f, back when f yields or finishes its thread. */
void fiber_resume(emu_thread &t, fiber *f)
{
    t.current = f;
    threadIdx = f->tid;
#ifdef STRATA_EMU_ASAN
    __sanitizer_start_switch_fiber(&t.sched_fake_stack, f->stack, f->stack_size);
#endif
#ifdef STRATA_EMU_ASM_SWITCH
    strata_emu_switch(&t.sched_sp, f->sp);
#else
    if (swapcontext(&t.sched_ctx, &f->ctx) != 0)
        emu_die("swapcontext failed: %s", strerror(errno));
#endif
#ifdef STRATA_EMU_ASAN
    __sanitizer_finish_switch_fiber(t.sched_fake_stack, nullptr, nullptr);
#endif
    t.current = nullptr;
}

/* Fiber -> scheduler; returns when the scheduler resumes this fiber. */
void fiber_yield(emu_thread &t, fiber *f)
{
#ifdef STRATA_EMU_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, t.sched_stack_bottom, t.sched_stack_size);
#endif
#ifdef STRATA_EMU_ASM_SWITCH
    strata_emu_switch(&f->sp, t.sched_sp);
#else
    if (swapcontext(&f->ctx, &t.sched_ctx) != 0)
        emu_die("swapcontext failed: %s", strerror(errno));
#endif
#ifdef STRATA_EMU_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &t.sched_stack_bottom, &t.sched_stack_size);
#endif
}

/* Every fiber's body: one emulated thread of one block per turn, forever
 * (the pool keeps fibers for the OS thread's lifetime). */
void fiber_main()
{
    emu_thread &t = t_emu;
#ifdef STRATA_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &t.sched_stack_bottom, &t.sched_stack_size);
#endif
    for (;;) {
        fiber *f = t.current;
        t.launch->call(t.launch->ctx);
        f->state = F_DONE;
        fiber_yield(t, f);
    }
}

fiber *current_fiber(const char *what)
{
    fiber *f = t_emu.current;
    if (f == nullptr)
        emu_die("%s called outside a kernel", what);
    return f;
}

const char *op_name(warp_op op)
{
    switch (op) {
    case WARP_SHFL_XOR: return "__shfl_xor_sync";
    case WARP_SHFL_DOWN: return "__shfl_down_sync";
    case WARP_SYNC: return "__syncwarp";
    }
    return "warp operation";
}

/* Releases warp w if every lane waits in a warp operation: computes each
 * lane's result first (so that no lane can overwrite a value another still
 * has to read). Aborts on what the hardware leaves undefined: lanes that do
 * not exist or have exited, or lanes in different operations. Returns true
 * if it released the warp. */
bool warp_try_release(const launch_desc &d, std::vector<fiber *> &fibers, unsigned nthreads,
                      unsigned w)
{
    unsigned first = w * 32;
    unsigned lanes = nthreads - first < 32 ? nthreads - first : 32;
    unsigned waiting = 0;
    for (unsigned l = 0; l < lanes; l++) {
        fiber_state s = fibers[first + l]->state;
        if (s == F_READY || s == F_WAIT_BAR)
            return false;
        if (s == F_WAIT_WARP)
            waiting++;
    }
    if (waiting == 0)
        return false;
    fiber *lead = nullptr;
    for (unsigned l = 0; l < lanes; l++)
        if (fibers[first + l]->state == F_WAIT_WARP) {
            lead = fibers[first + l];
            break;
        }
    if (lanes < 32)
        emu_die("%s: %s with the full mask in warp %u of a %u-thread block, which has only %u "
                "lanes (block (%u,%u,%u))",
                d.name, op_name(lead->wop), w, nthreads, lanes, blockIdx.x, blockIdx.y,
                blockIdx.z);
    for (unsigned l = 0; l < lanes; l++) {
        fiber *f = fibers[first + l];
        if (f->state == F_DONE)
            emu_die("%s: %s with the full mask in warp %u after lane %u exited (block (%u,%u,%u))",
                    d.name, op_name(lead->wop), w, l, blockIdx.x, blockIdx.y, blockIdx.z);
        if (f->wop != lead->wop)
            emu_die("%s: lanes of warp %u are in different warp operations (%s, %s) (block "
                    "(%u,%u,%u))",
                    d.name, w, op_name(lead->wop), op_name(f->wop), blockIdx.x, blockIdx.y,
                    blockIdx.z);
    }
    for (unsigned l = 0; l < 32; l++) {
        fiber *f = fibers[first + l];
        unsigned src = l;
        if (f->wop == WARP_SHFL_XOR)
            src = l ^ (unsigned)f->warg;
        else if (f->wop == WARP_SHFL_DOWN)
            src = l + (unsigned)f->warg;
        if (src >= 32)
            src = l; /* out of the warp: the lane keeps its own value */
        f->wresult = fibers[first + src]->wval;
    }
    for (unsigned l = 0; l < 32; l++)
        fibers[first + l]->state = F_READY;
    return true;
}

/* Aborts with what every thread of the stuck block is waiting for. */
[[noreturn]] void report_deadlock(const launch_desc &d, std::vector<fiber *> &fibers,
                                  unsigned nthreads)
{
    unsigned bar = 0, warp = 0, done = 0;
    unsigned first_bar = nthreads, first_warp = nthreads;
    for (unsigned i = 0; i < nthreads; i++) {
        switch (fibers[i]->state) {
        case F_WAIT_BAR:
            if (bar++ == 0)
                first_bar = i;
            break;
        case F_WAIT_WARP:
            if (warp++ == 0)
                first_warp = i;
            break;
        case F_DONE: done++; break;
        case F_READY: break;
        }
    }
    emu_die("deadlock in kernel %s, block (%u,%u,%u) of %u threads: %u wait at __syncthreads "
            "(first: thread %u), %u in warp operations that some lanes of their warp never reach "
            "(first: thread %u), %u exited. A barrier or shuffle inside divergent code?",
            d.name, blockIdx.x, blockIdx.y, blockIdx.z, nthreads, bar, first_bar, warp,
            first_warp, done);
}

/* --- schedules ---------------------------------------------------------------- */
constexpr uint64_t k_default_seed = 0x5eed5eedu;

std::once_flag g_sched_once;
std::atomic<int> g_sched_kind{SCHEDULE_FORWARD};
std::atomic<uint64_t> g_sched_seed{k_default_seed};

/* Sets the schedule from STRATA_EMU_SCHEDULE and STRATA_EMU_SEED (decimal,
 * or hex with 0x); unset or empty means forward and the default seed. A
 * value it does not know aborts: a typo must not silently test forward. */
void sched_from_env()
{
    schedule_kind kind = SCHEDULE_FORWARD;
    const char *name = getenv("STRATA_EMU_SCHEDULE");
    if (name != nullptr && *name != '\0' && !schedule_parse(name, &kind))
        emu_die("STRATA_EMU_SCHEDULE=%s: expected forward, reverse or shuffle", name);
    uint64_t seed = k_default_seed;
    const char *s = getenv("STRATA_EMU_SEED");
    if (s != nullptr && *s != '\0') {
        char *end = nullptr;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 0);
        if (errno != 0 || end == s || *end != '\0' || *s == '-')
            emu_die("STRATA_EMU_SEED=%s: expected an unsigned 64-bit integer", s);
        seed = (uint64_t)v;
    }
    g_sched_seed.store(seed);
    g_sched_kind.store(kind);
}

/* splitmix64: a full-period step and a strong finaliser, enough to draw
 * orders that have no relation to thread or block indices. */
uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t rng_next(uint64_t &state)
{
    state += 0x9e3779b97f4a7c15ull;
    return mix64(state);
}

/* A launch's random stream: the seed, the kernel's name and the launch's
 * shape, so that a launch repeated with the same inputs (two runs a test
 * compares bit for bit) gets the same orders however many launches came
 * before it or ran on other OS threads. */
uint64_t launch_stream(uint64_t seed, const launch_desc &d)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a over the name */
    for (const char *p = d.name; *p != '\0'; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
    const uint64_t dims[] = {d.grid.x, d.grid.y, d.grid.z, d.block.x, d.block.y, d.block.z,
                             (uint64_t)d.smem};
    for (uint64_t v : dims)
        h = mix64(h ^ v);
    return mix64(seed ^ h);
}

/* The order of a launch's blocks: position k of [0, total) -> the linear
 * index of the block run k-th. shuffle is a keyed Feistel permutation of
 * the smallest even-bit power of two >= total, walked until it lands inside
 * [0, total) (still a permutation, no table even for huge grids). */
struct block_order {
    schedule_kind kind;
    uint64_t total;
    unsigned half_bits;
    uint64_t keys[4];
};

block_order block_order_make(schedule_kind kind, uint64_t total, uint64_t &rng)
{
    block_order o{kind, total, 1, {0, 0, 0, 0}};
    while (o.half_bits < 32 && (total - 1) >> (2 * o.half_bits) != 0)
        o.half_bits++;
    for (uint64_t &k : o.keys)
        k = rng_next(rng);
    return o;
}

uint64_t feistel(const block_order &o, uint64_t v)
{
    unsigned h = o.half_bits;
    uint64_t mask = h >= 32 ? 0xffffffffull : (1ull << h) - 1;
    uint64_t l = (v >> h) & mask, r = v & mask;
    for (uint64_t key : o.keys) {
        uint64_t f = mix64(r ^ key) & mask;
        uint64_t nl = r;
        r = l ^ f;
        l = nl;
    }
    return (l << h) | r;
}

uint64_t block_at(const block_order &o, uint64_t k)
{
    switch (o.kind) {
    case SCHEDULE_FORWARD: return k;
    case SCHEDULE_REVERSE: return o.total - 1 - k;
    case SCHEDULE_SHUFFLE:
        do
            k = feistel(o, k);
        while (k >= o.total);
        return k;
    }
    return k;
}

/* Shuffles v[0..n) in place (Fisher-Yates) from the launch's stream. */
void shuffle_in_place(unsigned *v, unsigned n, uint64_t &rng)
{
    for (unsigned i = n; i > 1; i--) {
        unsigned j = (unsigned)(rng_next(rng) % i);
        unsigned tmp = v[i - 1];
        v[i - 1] = v[j];
        v[j] = tmp;
    }
}

/* The priority order of a block's threads for reverse and shuffle, drawn
 * at the block's start and after every barrier: t.order holds the warps
 * one after another, each as its lanes' thread indices (t.warp_pos[w]:
 * where warp w's lanes start). reverse: the last warp first, lanes from
 * the highest; shuffle: warps and each warp's lanes in a fresh random
 * order. */
void order_draw(emu_thread &t, unsigned nthreads)
{
    unsigned nwarps = (nthreads + 31) / 32;
    t.order.resize(nthreads);
    t.warp_pos.resize(nwarps);
    t.warp_seq.resize(nwarps);
    for (unsigned w = 0; w < nwarps; w++)
        t.warp_seq[w] = t.sched == SCHEDULE_REVERSE ? nwarps - 1 - w : w;
    if (t.sched == SCHEDULE_SHUFFLE)
        shuffle_in_place(t.warp_seq.data(), nwarps, t.rng);
    unsigned pos = 0;
    for (unsigned k = 0; k < nwarps; k++) {
        unsigned w = t.warp_seq[k], first = 32 * w;
        unsigned lanes = nthreads - first < 32 ? nthreads - first : 32;
        t.warp_pos[w] = pos;
        for (unsigned l = 0; l < lanes; l++)
            t.order[pos + l] = t.sched == SCHEDULE_REVERSE ? first + lanes - 1 - l : first + l;
        if (t.sched == SCHEDULE_SHUFFLE)
            shuffle_in_place(&t.order[pos], lanes, t.rng);
        pos += lanes;
    }
}

/* Every live thread waits at __syncthreads: lets them all go on. Aborts on
 * a barrier in divergent code (threads at different source places) and on
 * a deadlock (a live thread not at the barrier, waiting for a warp
 * operation that can never complete). */
void barrier_release(const launch_desc &d, std::vector<fiber *> &fibers, unsigned nthreads)
{
    const fiber *first = nullptr;
    for (unsigned i = 0; i < nthreads; i++) {
        fiber *f = fibers[i];
        if (f->state == F_DONE)
            continue;
        if (f->state != F_WAIT_BAR)
            report_deadlock(d, fibers, nthreads);
        if (first == nullptr) {
            first = f;
        } else if (f->bar_line != first->bar_line ||
                   (f->bar_file != first->bar_file && strcmp(f->bar_file, first->bar_file))) {
            emu_die("kernel %s, block (%u,%u,%u): threads wait at different __syncthreads: "
                    "thread (%u,%u,%u) at %s:%d, thread (%u,%u,%u) at %s:%d (a barrier in "
                    "divergent code)",
                    d.name, blockIdx.x, blockIdx.y, blockIdx.z, first->tid.x, first->tid.y,
                    first->tid.z, first->bar_file, first->bar_line, f->tid.x, f->tid.y,
                    f->tid.z, f->bar_file, f->bar_line);
        }
    }
    for (unsigned i = 0; i < nthreads; i++)
        if (fibers[i]->state == F_WAIT_BAR)
            fibers[i]->state = F_READY;
}

/* forward: rounds. Each round resumes every ready thread in index order,
 * then releases the warps whose lanes all wait in a warp operation; when
 * none can be released, the barrier. Warps thus move in lockstep, one
 * warp operation per round. Returns when every thread has exited. */
void run_rounds(emu_thread &t, const launch_desc &d, unsigned nthreads)
{
    std::vector<fiber *> &fibers = t.pool;
    unsigned live = nthreads;
    unsigned nwarps = (nthreads + 31) / 32;
    while (live > 0) {
        for (unsigned i = 0; i < nthreads; i++) {
            fiber *f = fibers[i];
            if (f->state != F_READY)
                continue;
            fiber_resume(t, f);
            if (f->state == F_DONE)
                live--;
        }
        if (live == 0)
            break;
        bool released = false;
        for (unsigned w = 0; w < nwarps; w++)
            if (warp_try_release(d, fibers, nthreads, w))
                released = true;
        if (!released)
            barrier_release(d, fibers, nthreads);
    }
}

/* reverse and shuffle: strict priority in order_draw's order. The first
 * ready thread in the order runs; a warp whose last lane arrives at a warp
 * operation is released at once and, being first among the ready, runs
 * on: a warp runs its whole barrier interval (every shuffle of it) before
 * the next warp starts its own. So warps are as far out of step as they
 * can be, where forward keeps them in lockstep; between them the two
 * extremes show races across warps that either hides. */
void run_by_warps(emu_thread &t, const launch_desc &d, unsigned nthreads)
{
    std::vector<fiber *> &fibers = t.pool;
    unsigned live = nthreads;
    order_draw(t, nthreads);
    while (live > 0) {
        unsigned p = 0;
        while (p < nthreads) {
            unsigned i = t.order[p];
            fiber *f = fibers[i];
            if (f->state != F_READY) {
                p++;
                continue;
            }
            fiber_resume(t, f);
            if (f->state == F_DONE)
                live--;
            if (f->state == F_WAIT_BAR)
                continue;
            unsigned w = i / 32;
            if (!warp_try_release(d, fibers, nthreads, w))
                continue;
            p = t.warp_pos[w];
            if (t.sched == SCHEDULE_SHUFFLE) {
                unsigned lanes = nthreads - 32 * w < 32 ? nthreads - 32 * w : 32;
                shuffle_in_place(&t.order[p], lanes, t.rng);
            }
        }
        if (live == 0)
            break;
        barrier_release(d, fibers, nthreads);
        order_draw(t, nthreads);
    }
}

/* Runs one block to completion. */
void run_block(emu_thread &t, const launch_desc &d, unsigned nthreads)
{
    std::vector<fiber *> &fibers = t.pool;
    if (d.smem > 0)
        memset(t.smem, 0xff, d.smem);
    for (unsigned i = 0; i < nthreads; i++) {
        fiber *f = fibers[i];
        f->state = F_READY;
        f->tid.x = i % d.block.x;
        f->tid.y = (i / d.block.x) % d.block.y;
        f->tid.z = i / (d.block.x * d.block.y);
    }
    if (t.sched == SCHEDULE_FORWARD)
        run_rounds(t, d, nthreads);
    else
        run_by_warps(t, d, nthreads);
}

/* The limits of a real launch (sm_80/sm_90): what the GPU would refuse is an
 * abort here, never a silently working emulation. */
void check_launch(const launch_desc &d)
{
    const dim3 &g = d.grid, &b = d.block;
    if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
        emu_die("launch of %s with a zero dimension: grid (%u,%u,%u), block (%u,%u,%u)", d.name,
                g.x, g.y, g.z, b.x, b.y, b.z);
    unsigned long long threads = (unsigned long long)b.x * b.y * b.z;
    if (threads > k_max_threads || b.x > 1024 || b.y > 1024 || b.z > 64)
        emu_die("launch of %s with block (%u,%u,%u): %llu threads, over the limit of %u per "
                "block (x, y <= 1024, z <= 64)",
                d.name, b.x, b.y, b.z, threads, k_max_threads);
    if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
        emu_die("launch of %s with grid (%u,%u,%u): over the limits (2^31-1, 65535, 65535)",
                d.name, g.x, g.y, g.z);
    if (d.smem > k_max_smem)
        emu_die("launch of %s with %zu bytes of dynamic shared memory: over the %zu the GPU has",
                d.name, d.smem, k_max_smem);
}

} /* namespace */

/* Process-wide largest dynamic shared memory opted into with
 * cudaFuncSetAttribute (the emulator cannot tell kernels apart by address
 * at launch, so it checks that some opt-in covers the launch). */
static std::atomic<size_t> g_smem_optin{k_default_smem};

void launch(const launch_desc &d)
{
    emu_thread &t = t_emu;
    if (t.launch != nullptr)
        emu_die("launch of %s from inside kernel %s (dynamic parallelism is not emulated)",
                d.name, t.launch->name);
    check_launch(d);
    if (d.smem > g_smem_optin.load())
        emu_die("launch of %s with %zu bytes of dynamic shared memory, over 48 KiB without "
                "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n)",
                d.name, d.smem);
    cudaError_t st = cudaStreamSynchronize(d.stream);
    if (st != cudaSuccess)
        emu_die("launch of %s on stream %p, which was never created or is destroyed", d.name,
                static_cast<void *>(d.stream));
    unsigned nthreads = d.block.x * d.block.y * d.block.z;
    while (t.pool.size() < nthreads)
        t.pool.push_back(fiber_new());
    /* Exactly the requested bytes, so that ASan sees reads past them. */
    unsigned char *smem = static_cast<unsigned char *>(malloc(d.smem > 0 ? d.smem : 1));
    if (smem == nullptr)
        emu_die("out of host memory for %zu bytes of shared memory", d.smem);
    t.smem = smem;
    t.launch = &d;
    uint64_t seed = 0;
    t.sched = schedule_get(&seed);
    t.rng = launch_stream(seed, d);
    gridDim = d.grid;
    blockDim = d.block;
    uint64_t gx = d.grid.x, gxy = gx * d.grid.y;
    block_order order = block_order_make(t.sched, gxy * d.grid.z, t.rng);
    for (uint64_t k = 0; k < order.total; k++) {
        uint64_t b = block_at(order, k);
        blockIdx = uint3{(unsigned)(b % gx), (unsigned)(b / gx % d.grid.y), (unsigned)(b / gxy)};
        run_block(t, d, nthreads);
    }
    t.launch = nullptr;
    t.smem = nullptr;
    free(smem);
}

schedule_kind schedule_get(uint64_t *seed)
{
    std::call_once(g_sched_once, sched_from_env);
    if (seed != nullptr)
        *seed = g_sched_seed.load();
    return (schedule_kind)g_sched_kind.load();
}

void schedule_set(schedule_kind kind, uint64_t seed)
{
    std::call_once(g_sched_once, sched_from_env); /* so that it cannot run later and undo this */
    g_sched_seed.store(seed);
    g_sched_kind.store(kind);
}

void schedule_reload()
{
    std::call_once(g_sched_once, sched_from_env);
    sched_from_env();
}

bool schedule_parse(const char *name, schedule_kind *kind)
{
    static const schedule_kind kinds[] = {SCHEDULE_FORWARD, SCHEDULE_REVERSE, SCHEDULE_SHUFFLE};
    for (schedule_kind k : kinds)
        if (strcmp(name, schedule_name(k)) == 0) {
            *kind = k;
            return true;
        }
    return false;
}

const char *schedule_name(schedule_kind kind)
{
    switch (kind) {
    case SCHEDULE_FORWARD: return "forward";
    case SCHEDULE_REVERSE: return "reverse";
    case SCHEDULE_SHUFFLE: return "shuffle";
    }
    return "unknown";
}

size_t fiber_stack_bytes() { return k_stack_bytes; }

unsigned char *dyn_smem()
{
    current_fiber("CU_DYN_SMEM");
    return t_emu.smem;
}

void syncthreads(const char *file, int line)
{
    emu_thread &t = t_emu;
    fiber *f = current_fiber("__syncthreads");
    f->state = F_WAIT_BAR;
    f->bar_file = file;
    f->bar_line = line;
    fiber_yield(t, f);
}

uint64_t warp_exchange(unsigned mask, warp_op op, int arg, int width, uint64_t value)
{
    emu_thread &t = t_emu;
    fiber *f = current_fiber(op_name(op));
    if (mask != 0xffffffffu)
        emu_die("kernel %s: %s with mask 0x%08x: only the full mask is supported",
                t.launch->name, op_name(op), mask);
    if (width != 32)
        emu_die("kernel %s: %s with width %d: only width 32 is supported", t.launch->name,
                op_name(op), width);
    if (op != WARP_SYNC && (arg < 0 || arg >= 32))
        emu_die("kernel %s: %s with lane argument %d, outside 0..31", t.launch->name,
                op_name(op), arg);
    f->state = F_WAIT_WARP;
    f->wop = op;
    f->warg = arg;
    f->wval = value;
    fiber_yield(t, f);
    return f->wresult;
}

} /* namespace strata_emu */

/* --- cudart ----------------------------------------------------------------- */
namespace {

/* Device allocations (address -> size), pinned host allocations and live
 * streams, shared by all OS threads. */
struct emu_runtime {
    std::mutex mu;
    std::map<uintptr_t, size_t> device;
    std::set<void *> pinned;
    std::set<cudaStream_t> streams;
    size_t used = 0;
};

emu_runtime &rt()
{
    static emu_runtime *r = new emu_runtime(); /* never destroyed: usable at exit */
    return *r;
}

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local int t_device = 0;

cudaError_t record(cudaError_t e)
{
    if (e != cudaSuccess)
        t_last_error = e;
    return e;
}

/* STRATA_EMU_MEMORY bytes (default 8 GiB); an unparsable value is the
 * default. */
size_t emu_memory()
{
    const char *s = getenv("STRATA_EMU_MEMORY");
    if (s == nullptr || *s == '\0')
        return (size_t)strata_emu::k_default_memory;
    char *end = nullptr;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0')
        return (size_t)strata_emu::k_default_memory;
    return (size_t)v;
}

/* STRATA_EMU_DEVICES devices (default 1, 0..64). */
int emu_devices()
{
    const char *s = getenv("STRATA_EMU_DEVICES");
    if (s == nullptr || *s == '\0')
        return 1;
    char *end = nullptr;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < 0 || v > 64)
        return 1;
    return (int)v;
}

/* Whether [p, p + n) lies inside one device allocation (caller holds mu). */
bool in_device(emu_runtime &r, const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;
    auto it = r.device.upper_bound(a);
    if (it == r.device.begin())
        return false;
    --it;
    return a >= it->first && n <= it->second && a - it->first <= it->second - n;
}

bool stream_ok(emu_runtime &r, cudaStream_t s)
{
    return s == nullptr || r.streams.count(s) != 0;
}

/* Checks a copy's pointers against its kind, as the GPU would fault on a
 * host pointer used as a device one. */
cudaError_t check_copy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                       cudaStream_t stream)
{
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    if (!stream_ok(r, stream))
        return cudaErrorInvalidResourceHandle;
    if (count == 0)
        return cudaSuccess;
    if (dst == nullptr || src == nullptr)
        return cudaErrorInvalidValue;
    bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if ((int)kind < 0 || (int)kind > cudaMemcpyDefault)
        return cudaErrorInvalidValue;
    if (kind == cudaMemcpyDefault)
        return cudaSuccess;
    if (dst_dev && !in_device(r, dst, count))
        return cudaErrorInvalidValue;
    if (src_dev && !in_device(r, src, count))
        return cudaErrorInvalidValue;
    if (!dst_dev && in_device(r, dst, 1))
        return cudaErrorInvalidValue;
    if (!src_dev && in_device(r, src, 1))
        return cudaErrorInvalidValue;
    return cudaSuccess;
}

} /* namespace */

extern "C" {

cudaError_t cudaMalloc(void **ptr, size_t size)
{
    if (ptr == nullptr)
        return record(cudaErrorInvalidValue);
    *ptr = nullptr;
    if (emu_devices() == 0)
        return record(cudaErrorNoDevice);
    if (size == 0)
        return cudaSuccess;
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    size_t total = emu_memory();
    if (size > total || r.used > total - size)
        return record(cudaErrorMemoryAllocation);
    /* 256-byte aligned as cudaMalloc's; not zeroed on a GPU either. */
    /* Exactly size bytes, so that ASan sees accesses past the end. */
    void *p = nullptr;
    if (posix_memalign(&p, 256, size) != 0)
        return record(cudaErrorMemoryAllocation);
    /* Fresh device memory holds garbage: make reads before writes show. */
    memset(p, 0xff, size);
    r.device[(uintptr_t)p] = size;
    r.used += size;
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFree(void *ptr)
{
    if (ptr == nullptr)
        return cudaSuccess;
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.device.find((uintptr_t)ptr);
    if (it == r.device.end())
        return record(cudaErrorInvalidValue);
    r.used -= it->second;
    r.device.erase(it);
    free(ptr);
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **ptr, size_t size)
{
    if (ptr == nullptr)
        return record(cudaErrorInvalidValue);
    *ptr = nullptr;
    void *p = malloc(size > 0 ? size : 1);
    if (p == nullptr)
        return record(cudaErrorMemoryAllocation);
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    r.pinned.insert(p);
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFreeHost(void *ptr)
{
    if (ptr == nullptr)
        return cudaSuccess;
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.pinned.erase(ptr) == 0)
        return record(cudaErrorInvalidValue);
    free(ptr);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind)
{
    return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream)
{
    cudaError_t e = check_copy(dst, src, count, kind, stream);
    if (e != cudaSuccess)
        return record(e);
    if (count > 0)
        memcpy(dst, src, count); /* overlapping copies are an error there too (ASan) */
    return cudaSuccess;
}

cudaError_t cudaMemset(void *dst, int value, size_t count)
{
    return cudaMemsetAsync(dst, value, count, nullptr);
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t count, cudaStream_t stream)
{
    {
        emu_runtime &r = rt();
        std::lock_guard<std::mutex> lock(r.mu);
        if (!stream_ok(r, stream))
            return record(cudaErrorInvalidResourceHandle);
        if (count > 0 && !in_device(r, dst, count))
            return record(cudaErrorInvalidValue);
    }
    if (count > 0)
        memset(dst, value, count);
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *stream)
{
    return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags)
{
    if (stream == nullptr || (flags != cudaStreamDefault && flags != cudaStreamNonBlocking))
        return record(cudaErrorInvalidValue);
    /* A distinct non-null handle; never dereferenced. */
    cudaStream_t s = reinterpret_cast<cudaStream_t>(malloc(1));
    if (s == nullptr)
        return record(cudaErrorMemoryAllocation);
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    r.streams.insert(s);
    *stream = s;
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    if (stream == nullptr || r.streams.erase(stream) == 0)
        return record(cudaErrorInvalidResourceHandle);
    free(reinterpret_cast<void *>(stream));
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    return stream_ok(r, stream) ? cudaSuccess : record(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaSetDevice(int device)
{
    int n = emu_devices();
    if (n == 0)
        return record(cudaErrorNoDevice);
    if (device < 0 || device >= n)
        return record(cudaErrorInvalidDevice);
    t_device = device;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device)
{
    if (device == nullptr)
        return record(cudaErrorInvalidValue);
    if (emu_devices() == 0)
        return record(cudaErrorNoDevice);
    *device = t_device;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int *count)
{
    if (count == nullptr)
        return record(cudaErrorInvalidValue);
    *count = emu_devices();
    return *count == 0 ? record(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device)
{
    if (prop == nullptr)
        return record(cudaErrorInvalidValue);
    int n = emu_devices();
    if (n == 0)
        return record(cudaErrorNoDevice);
    if (device < 0 || device >= n)
        return record(cudaErrorInvalidDevice);
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "%s", "strata CUDA emulator");
    prop->totalGlobalMem = emu_memory();
    prop->sharedMemPerBlock = strata_emu::k_default_smem;
    prop->regsPerBlock = 65536;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->maxThreadsDim[0] = 1024;
    prop->maxThreadsDim[1] = 1024;
    prop->maxThreadsDim[2] = 64;
    prop->maxGridSize[0] = 2147483647;
    prop->maxGridSize[1] = 65535;
    prop->maxGridSize[2] = 65535;
    prop->totalConstMem = 65536;
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = 4;
    prop->l2CacheSize = 4 << 20;
    prop->maxThreadsPerMultiProcessor = 2048;
    prop->sharedMemPerBlockOptin = strata_emu::k_max_smem;
    prop->sharedMemPerMultiprocessor = 233472;
    prop->pciDeviceID = device;
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
    if (free_bytes == nullptr || total_bytes == nullptr)
        return record(cudaErrorInvalidValue);
    if (emu_devices() == 0)
        return record(cudaErrorNoDevice);
    emu_runtime &r = rt();
    std::lock_guard<std::mutex> lock(r.mu);
    size_t total = emu_memory();
    *total_bytes = total;
    *free_bytes = r.used < total ? total - r.used : 0;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = t_last_error;
    t_last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

const char *cudaGetErrorString(cudaError_t error)
{
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInsufficientDriver:
        return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    }
    return "unrecognized error code";
}

const char *cudaGetErrorName(cudaError_t error)
{
    switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    }
    return "cudaErrorUnknown";
}

cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value)
{
    if (func == nullptr)
        return record(cudaErrorInvalidValue);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || (size_t)value > strata_emu::k_max_smem)
            return record(cudaErrorInvalidValue);
        size_t cur = strata_emu::g_smem_optin.load();
        while ((size_t)value > cur && !strata_emu::g_smem_optin.compare_exchange_weak(cur, (size_t)value)) {
        }
        return cudaSuccess;
    }
    if (attr == cudaFuncAttributePreferredSharedMemoryCarveout)
        return value >= -1 && value <= 100 ? cudaSuccess : record(cudaErrorInvalidValue);
    return record(cudaErrorInvalidValue);
}

cudaError_t cudaDriverGetVersion(int *version)
{
    if (version == nullptr)
        return record(cudaErrorInvalidValue);
    *version = 13000;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *version)
{
    if (version == nullptr)
        return record(cudaErrorInvalidValue);
    *version = 13000;
    return cudaSuccess;
}

} /* extern "C" */
