/* fuzz.h - what the fuzz targets in tests/fuzz/ share: libFuzzer's entry
 * point, which both libFuzzer (make fuzz) and the replay driver (make
 * fuzz-replay) call once per input, and the check that stops a run when a
 * parser breaks a promise its header makes. */
#ifndef STRATA_FUZZ_H
#define STRATA_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Runs one input through a target. Returns 0 (libFuzzer reserves the rest). */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken invariant is a finding like a crash: abort, so that libFuzzer
 * saves the input and the replay driver fails. */
#define FUZZ_CHECK(cond)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                      \
        }                                                                                 \
    } while (0)

#endif
