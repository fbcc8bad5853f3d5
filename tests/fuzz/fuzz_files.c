/* fuzz_files.c - the file-based parsers: the bytes are parsed as a GGUF
 * file, and written to a memory file and read as an image (decoded, and
 * probed from its headers, which must give the decoded size), a tar archive,
 * a dataset JSONL as an upload is validated, and the same JSONL measured
 * in tokens for the tiny dense model as an upload then is (its
 * conversations parsed again, rendered and tokenized). */
#include <stdio.h>
#include <stdlib.h>
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    GfError err;
    Image img;
    static const ImageLimits lim = {1u << 20, 1u << 22};
    int pw, ph;
    GfStatus probed = image_probe(data, size, &lim, &pw, &ph, &err);
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
    DatasetReport report;
    dataset_validate(path, NULL, &dl, &report, &err);
    dataset_report_free(&report);
    TrainSetStats stats;
    trainset_measure(pipeline(), path, NULL, 4096, &lim, 100, &stats, &report, &err);
    dataset_report_free(&report);
    close(fd);
    return 0;
}
