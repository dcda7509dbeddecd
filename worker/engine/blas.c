/* blas.c - see blas.h. */
#include "worker/engine/blas.h"

#include "common/log.h"

#include <cblas.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define BLAS_X86 1
#endif

/* Set in the re-executed process only, so it never re-executes again. */
#define BLAS_MARKER "STRATA_BLAS_REEXEC"

const char *blas_core_name(void) {
    const char *name = openblas_get_corename();
    return name && *name ? name : "unknown";
}

/* How capable a core's kernels are: 0 generic / pre-AVX, 1 AVX, 2 AVX2+FMA,
 * 3 AVX-512; -1 for names we do not rank (left alone). */
static int blas_core_rank(const char *core) {
    static const char *const old[] = {"prescott", "core2",  "penryn",    "dunnington", "nehalem",
                                      "atom",     "katmai", "coppermine", "northwood", "banias",
                                      "unknown",  "generic"};
    for (size_t i = 0; i < sizeof old / sizeof old[0]; i++)
        if (strcasecmp(core, old[i]) == 0) return 0;
    if (strcasecmp(core, "sandybridge") == 0) return 1;
    if (strcasecmp(core, "haswell") == 0) return 2;
    if (strcasecmp(core, "skylakex") == 0 || strcasecmp(core, "cooperlake") == 0 ||
        strcasecmp(core, "sapphirerapids") == 0)
        return 3;
    return -1;
}

#ifdef BLAS_X86
/* The OS must save the wider registers too (XCR0), or the CPU bits lie. */
static uint64_t blas_xgetbv(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t)edx << 32 | eax;
}
#endif

/* The best kernel family this CPU and OS support: 3 AVX-512, 2 AVX2+FMA,
 * 0 otherwise. Fills features with a short description for the log. */
static int blas_cpu_rank(char *features, size_t len) {
    snprintf(features, len, "no AVX2");
#ifdef BLAS_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
    if (!osxsave || !avx) return 0;
    uint64_t xcr0 = blas_xgetbv();
    if ((xcr0 & 0x6) != 0x6) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    bool avx2 = b & (1u << 5);
    bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
    if (avx512 && (xcr0 & 0xe0) == 0xe0) {
        snprintf(features, len, "AVX-512 F/DQ/BW/VL");
        return 3;
    }
    if (avx2 && fma) {
        snprintf(features, len, "AVX2 and FMA");
        return 2;
    }
#endif
    return 0;
}

int blas_setup(int argc, char **argv) {
    (void)argc;
    const char *user = getenv("OPENBLAS_CORETYPE");
    if (getenv(BLAS_MARKER)) {
        log_info("OpenBLAS uses the %s kernels (OPENBLAS_CORETYPE=%s, chosen for this CPU)",
                 blas_core_name(), user ? user : "?");
        /* The variable stays set, so children keep the choice as if the user
         * had made it. */
        unsetenv(BLAS_MARKER);
        return 0;
    }
    if (user && *user) {
        log_info("OpenBLAS uses the %s kernels (OPENBLAS_CORETYPE=%s set by the user)",
                 blas_core_name(), user);
        return 0;
    }
    const char *core = blas_core_name();
    char features[64];
    int have = blas_core_rank(core), best = blas_cpu_rank(features, sizeof features);
    if (have < 0 || have >= best) {
        log_info("OpenBLAS uses the %s kernels (its own choice; CPU has %s)", core, features);
        return 0;
    }
    const char *want = best == 3 ? "SkylakeX" : "Haswell";
    log_info("OpenBLAS chose the %s kernels on a CPU with %s: re-executing with "
             "OPENBLAS_CORETYPE=%s",
             core, features, want);
    if (setenv("OPENBLAS_CORETYPE", want, 1) != 0 || setenv(BLAS_MARKER, "1", 1) != 0) {
        log_warn("cannot set OPENBLAS_CORETYPE; staying on the %s kernels", core);
        return 0;
    }
    execv("/proc/self/exe", argv);
    log_warn("re-exec failed; staying on the %s kernels", core);
    unsetenv(BLAS_MARKER);
    unsetenv("OPENBLAS_CORETYPE");
    return 0;
}
