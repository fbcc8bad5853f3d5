/* fuzz_files.c - the file-based parsers: the bytes are parsed as a GGUF
 * file, and written to a memory file and read as an image (decoded, and
 * probed from its headers, which must give the decoded size), a tar archive,
 * a dataset JSONL as an upload is validated (in one range of lines and in
 * three at once, which must report the same), and the same JSONL measured
 * in tokens for the tiny dense model as an upload then is (its
 * conversations parsed again, rendered and tokenized). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dataset.h"
#include "gguf.h"
#include "image.h"
#include "tar.h"
#include "trainset.h"

static Pipeline *g_pipe; /* the fuzz target's own: opened at the first input */

static void close_pipeline(void) { pipeline_close(g_pipe); }

static const Pipeline *pipeline(void) {
    static int tried;
    if (tried) return g_pipe;
    tried = 1;
    GfError err;
    ModelOptions mo = {.device = "cpu", .n_threads = 1};
    if (pipeline_open(GF_FIXTURES "/dense", &mo, &g_pipe, &err)) {
        fprintf(stderr, "fuzz_files: the dense fixture: %s\n", err.message);
        abort();
    }
    atexit(close_pipeline);
    return g_pipe;
}

static int memfile(const uint8_t *data, size_t size, char path[64]) {
    int fd = memfd_create("fuzz", 0);
    if (fd < 0) return -1;
    if (size && write(fd, data, size) != (ssize_t)size) { close(fd); return -1; }
    snprintf(path, 64, "/proc/self/fd/%d", fd);
    return fd;
}

static int same_report(const DatasetReport *a, const DatasetReport *b) {
    if (a->n_lines != b->n_lines || a->n_examples != b->n_examples || a->n_images != b->n_images ||
        a->n_bad_lines != b->n_bad_lines || a->n_issues != b->n_issues)
        return 0;
    for (size_t i = 0; i < a->n_issues; i++)
        if (a->issues[i].line != b->issues[i].line || strcmp(a->issues[i].code, b->issues[i].code) != 0 ||
            strcmp(a->issues[i].message, b->issues[i].message) != 0)
            return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    GfError err;
    Image img;
    static const ImageLimits lim = {1u << 20, 1u << 22};
    int pw, ph;
    GfStatus probed = image_probe(data, size, &lim, &pw, &ph, &err);
    /* what a job's set relies on: a prefix that holds the headers probes as the whole does */
    for (size_t k = 1; probed == GF_OK && k <= 64; k++) {
        size_t cut = size / 64 * k + (k == 64 ? size % 64 : 0); /* 64 lengths, the last the whole */
        int qw, qh;
        if (image_headers_within(data, cut) && (image_probe(data, cut, &lim, &qw, &qh, &err) != GF_OK || qw != pw || qh != ph))
            abort();
    }
    if (image_decode(data, size, &lim, &img, &err) == GF_OK) {
        /* what upload measuring relies on: the headers give the decoded size */
        if (probed != GF_OK || pw != img.width || ph != img.height) abort();
        image_free(&img);
    }
    Gguf g;
    if (gguf_parse(data, size, &g, &err) == GF_OK) {
        for (size_t i = 0; i < g.n_kv; i++) { /* walk what the accessors walk */
            uint64_t len;
            for (uint64_t k = 0; k < g.kv[i].n && k < 64; k++) (void)gguf_arr_str(&g.kv[i], k, &len);
        }
        gguf_close(&g);
    }
    char path[64];
    int fd = memfile(data, size, path);
    if (fd < 0) return 0;
    TarIndex t;
    if (tar_index_open(path, 1000, &t, &err) == GF_OK) tar_index_close(&t);
    DatasetLimits dl;
    dataset_limits_default(&dl);
    dl.min_examples = 1;
    dl.max_line_bytes = 1 << 16;
    dl.image = lim;
    DatasetReport report, ranged;
    dl.n_threads = 1;
    GfStatus one = dataset_validate(path, NULL, &dl, &report, &err);
    dl.n_threads = 3; /* the lines in three ranges at once: the same report */
    GfError err3;
    GfStatus three = dataset_validate(path, NULL, &dl, &ranged, &err3);
    if (one != three || !same_report(&report, &ranged) || (one && strcmp(err.message, err3.message) != 0)) abort();
    dataset_report_free(&report);
    dataset_report_free(&ranged);
    TrainSetStats stats;
    trainset_measure(pipeline(), path, NULL, 4096, &lim, 100, &stats, &report, &err);
    dataset_report_free(&report);
    close(fd);
    return 0;
}
