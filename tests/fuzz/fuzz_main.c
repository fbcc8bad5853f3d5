/* fuzz_main.c - a standalone driver for the fuzz targets when they are not
 * built with libFuzzer: runs every seed file given on the command line, then
 * a deterministic stream of mutations of them (bit flips, byte overwrites
 * with boundary values, truncation, duplication of a slice), so CI replays
 * the seeds and a short campaign under ASan+UBSan on every run. With clang,
 * -DGF_FUZZ=ON builds the same targets as real libFuzzer binaries.
 *
 * usage: fuzz_<target> ITERATIONS SEED_FILE...
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ITERATIONS SEED_FILE...\n", argv[0]);
        return 2;
    }
    long iterations = strtol(argv[1], NULL, 10);
    int n_seeds = argc - 2;
    uint8_t **seeds = calloc((size_t)n_seeds, sizeof *seeds);
    size_t *sizes = calloc((size_t)n_seeds, sizeof *sizes), max = 0;
    for (int i = 0; i < n_seeds; i++) {
        seeds[i] = slurp(argv[i + 2], &sizes[i]);
        if (!seeds[i]) { fprintf(stderr, "cannot read seed %s\n", argv[i + 2]); return 2; }
        LLVMFuzzerTestOneInput(seeds[i], sizes[i]);
        if (sizes[i] > max) max = sizes[i];
    }
    size_t cap = max * 2 + 64;
    uint8_t *buf = malloc(cap);
    for (long it = 0; it < iterations; it++) {
        int s = (int)(rnd() % (uint64_t)n_seeds);
        memcpy(buf, seeds[s], sizes[s]);
        size_t n = mutate(buf, sizes[s], cap);
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("%s: %d seeds, %ld mutations: 0 crashes\n", argv[0], n_seeds, iterations);
    for (int i = 0; i < n_seeds; i++) free(seeds[i]);
    free(seeds);
    free(sizes);
    free(buf);
    return 0;
}
