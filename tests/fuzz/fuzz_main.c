/* fuzz_main.c - a standalone driver for the fuzz targets when they are not
 * built with libFuzzer: runs every input given on the command line (files,
 * or directories of them: the committed corpus and the regression inputs),
 * then a deterministic stream of mutations of them (bit flips, byte
 * overwrites with boundary values, truncation, duplication of a slice), so
 * CI replays the corpus and a short campaign under ASan+UBSan on every run.
 * With clang, -DGF_FUZZ=ON builds the same targets as real libFuzzer
 * binaries (scripts/fuzz.sh: the long mode, which grows the corpus).
 *
 * usage: fuzz_<target> BUDGET INPUT...
 *   BUDGET: a number of mutations, or seconds of mutations as "20s"
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(len > 0 ? (size_t)len : 1);
    *n = b && len > 0 && fread(b, 1, (size_t)len, f) == (size_t)len ? (size_t)len : 0;
    fclose(f);
    return b;
}

static size_t mutate(uint8_t *buf, size_t n, size_t cap) {
    static const uint8_t special[] = {0, 1, 0x7f, 0x80, 0xff, '{', '}', '"', '\\', '[', ']', ',', ':', '0', '9', '/', '.'};
    int ops = 1 + (int)(rnd() % 4);
    for (int k = 0; k < ops && n > 0; k++) {
        size_t pos = rnd() % n;
        switch (rnd() % 5) {
        case 0: buf[pos] ^= (uint8_t)(1u << (rnd() % 8)); break;
        case 1: buf[pos] = special[rnd() % sizeof special]; break;
        case 2: n = pos + (n - pos) / 2; break;
        case 3: { /* duplicate a slice */
            size_t len = 1 + rnd() % 64;
            if (pos + len <= n && n + len <= cap) {
                memmove(buf + pos + len, buf + pos, n - pos);
                n += len;
            }
            break;
        }
        default: buf[pos] = (uint8_t)rnd(); break;
        }
    }
    return n;
}

typedef struct {
    uint8_t **data;
    size_t *size, n, cap, max;
} Inputs;

static int add_file(Inputs *in, const char *path) {
    if (in->n == in->cap) {
        in->cap = in->cap ? 2 * in->cap : 64;
        in->data = realloc(in->data, in->cap * sizeof *in->data);
        in->size = realloc(in->size, in->cap * sizeof *in->size);
        if (!in->data || !in->size) return -1;
    }
    in->data[in->n] = slurp(path, &in->size[in->n]);
    if (!in->data[in->n]) {
        fprintf(stderr, "cannot read input %s\n", path);
        return -1;
    }
    LLVMFuzzerTestOneInput(in->data[in->n], in->size[in->n]);
    if (in->size[in->n] > in->max) in->max = in->size[in->n];
    in->n++;
    return 0;
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A directory's regular files, in name order (so runs repeat). */
static int add_dir(Inputs *in, const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    char **names = NULL;
    size_t n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (e->d_name[0] == '.' || stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        names = realloc(names, (n + 1) * sizeof *names);
        names[n++] = strdup(path);
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, cmp_names);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (!rc) rc = add_file(in, names[i]);
        free(names[i]);
    }
    free(names);
    return rc;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUDGET INPUT...  (BUDGET: mutations, or seconds as 20s)\n", argv[0]);
        return 2;
    }
    char *end;
    long budget = strtol(argv[1], &end, 10);
    int timed = *end == 's';
    Inputs in = {0};
    for (int i = 2; i < argc; i++) {
        struct stat st;
        int rc = stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode) ? add_dir(&in, argv[i]) : add_file(&in, argv[i]);
        if (rc) return 2;
    }
    if (in.n == 0) {
        fprintf(stderr, "no inputs\n");
        return 2;
    }
    size_t cap = in.max * 2 + 64;
    uint8_t *buf = malloc(cap);
    double t_end = now_s() + (double)budget;
    long it = 0;
    for (; timed ? (it % 256 != 0 || now_s() < t_end) : it < budget; it++) {
        size_t s = (size_t)(rnd() % (uint64_t)in.n);
        memcpy(buf, in.data[s], in.size[s]);
        size_t n = mutate(buf, in.size[s], cap);
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("%s: %zu inputs, %ld mutations: 0 crashes\n", argv[0], in.n, it);
    for (size_t i = 0; i < in.n; i++) free(in.data[i]);
    free(in.data);
    free(in.size);
    free(buf);
    return 0;
}
