/* fuzz_dataset.c - fuzz target for the dataset parsers. The input is a whole
 * dataset file, parsed as each format (auto, alpaca, flan) with all records
 * and with max_examples 1. Checked beyond "no crash, no leak": an accepted
 * file yields at least one and at most max_examples examples, each with a
 * non-empty query, a response, and a system that is NULL or non-empty (an
 * empty one counts as none); a rejected file leaves the dataset empty and
 * its error names the file. */
#include "tests/fuzz/fuzz.h"

#include <string.h>

#include "common/util.h"
#include "worker/engine/dataset.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const enum ds_format formats[] = {DS_FORMAT_AUTO, DS_FORMAT_ALPACA, DS_FORMAT_FLAN};
    for (size_t f = 0; f < 3; f++) {
        for (size_t max = 0; max < 2; max++) {
            ds_dataset d;
            char err[ERR_LEN] = "";
            if (ds_parse("fuzz.json", (const char *)data, size, formats[f], NULL, max, &d, err,
                         sizeof err) != 0) {
                FUZZ_CHECK(d.n == 0 && d.items == NULL);
                FUZZ_CHECK(strncmp(err, "fuzz.json: ", 11) == 0 || strcmp(err, "out of memory") == 0);
                continue;
            }
            FUZZ_CHECK(d.n >= 1 && (max == 0 || d.n <= max));
            for (size_t i = 0; i < d.n; i++) {
                const ds_example *e = &d.items[i];
                FUZZ_CHECK(e->query && e->query[0] != '\0' && e->response);
                FUZZ_CHECK(!e->system || e->system[0] != '\0');
                if (formats[f] == DS_FORMAT_ALPACA) FUZZ_CHECK(e->task == NULL);
            }
            ds_free(&d);
        }
    }
    return 0;
}
