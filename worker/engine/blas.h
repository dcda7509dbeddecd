/* blas.h - choosing OpenBLAS's kernels for this CPU.
 *
 * Debian 12's OpenBLAS (0.3.21, DYNAMIC_ARCH) does not recognise recent Intel
 * CPUs and falls back to its "Prescott" kernels, about 6x slower for dgemm
 * than the SkylakeX ones the same CPU can run. OpenBLAS reads
 * OPENBLAS_CORETYPE only while it loads, so the choice has to be made before
 * the program's own code runs: blas_setup re-executes the program once with
 * the variable set. */
#ifndef STRATA_BLAS_H
#define STRATA_BLAS_H

/* Call first thing in main, before any other thread starts. If the user has
 * not set OPENBLAS_CORETYPE and OpenBLAS picked an older core than the CPU
 * supports (AVX-512 F/DQ/BW/VL -> SkylakeX, AVX2 + FMA -> Haswell), sets the
 * variable and re-executes /proc/self/exe with the same argv (argv must be
 * NULL-terminated, as main's is); does not return then. A marker variable
 * prevents a second re-exec. Logs which core OpenBLAS uses and why. Returns 0
 * (also when the re-exec fails: the program then runs on the old kernels,
 * with a warning). */
int blas_setup(int argc, char **argv);

/* The core OpenBLAS is using, e.g. "SkylakeX" (a static string). */
const char *blas_core_name(void);

#endif
