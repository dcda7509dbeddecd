/* replay.c - runs fuzz targets without libFuzzer: feeds every file named on
 * the command line, and every regular file in every directory named, to
 * LLVMFuzzerTestOneInput, in name order. Linked with each target by gcc
 * (make fuzz-replay), so the committed corpus is a regression test under
 * the plain, address and undefined builds.
 *
 * Each input is copied into a buffer of exactly its size, so a read one byte
 * past the end is caught by AddressSanitizer. Exits 0 when every input ran
 * (a finding aborts), 1 when an argument could not be read or held no
 * inputs. */
#include "tests/fuzz/fuzz.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Largest input replayed; the committed seeds are far smaller. */
#define REPLAY_MAX (16u << 20)

/* Reads path and runs it. Returns 0, or -1 with a message on stderr. */
static int replay_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "replay: open %s: %s\n", path, strerror(errno));
        return -1;
    }
    struct stat st;
    unsigned char *data = NULL;
    int rc = -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size > REPLAY_MAX) {
        fprintf(stderr, "replay: %s: not a regular file of at most %u bytes\n", path,
                REPLAY_MAX);
        goto out;
    }
    size_t size = (size_t)st.st_size;
    /* malloc(0) may return NULL; an empty input still gets a valid pointer. */
    data = malloc(size ? size : 1);
    if (!data) {
        fprintf(stderr, "replay: out of memory for %s\n", path);
        goto out;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, data + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            fprintf(stderr, "replay: read %s: %s\n", path, r < 0 ? strerror(errno) : "short");
            goto out;
        }
        got += (size_t)r;
    }
    LLVMFuzzerTestOneInput(data, size);
    rc = 0;
out:
    free(data);
    close(fd);
    return rc;
}

static int replay_skip_entry(const struct dirent *e) { return e->d_name[0] != '.'; }

/* Runs every regular file of dir in name order; *count gets how many.
 * Returns 0 or -1. */
static int replay_dir(const char *dir, size_t *count) {
    struct dirent **names = NULL;
    int n = scandir(dir, &names, replay_skip_entry, alphasort);
    if (n < 0) {
        fprintf(stderr, "replay: scandir %s: %s\n", dir, strerror(errno));
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        char path[4096];
        struct stat st;
        int len = snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        if (rc == 0 && (len < 0 || (size_t)len >= sizeof path)) {
            fprintf(stderr, "replay: path too long in %s\n", dir);
            rc = -1;
        } else if (rc == 0 && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            if (replay_file(path) != 0)
                rc = -1;
            else
                (*count)++;
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        struct stat st;
        size_t count = 0;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno));
            return 1;
        }
        if (S_ISDIR(st.st_mode) ? replay_dir(argv[i], &count) : replay_file(argv[i])) return 1;
        if (!S_ISDIR(st.st_mode)) count = 1;
        if (count == 0) {
            fprintf(stderr, "replay: %s holds no inputs\n", argv[i]);
            return 1;
        }
        printf("replay: %zu inputs from %s ran clean\n", count, argv[i]);
    }
    return 0;
}
