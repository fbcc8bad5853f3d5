/* test_dataset.c - upload validation checked in ranges of lines at once
 * (DatasetLimits.n_threads) reports exactly what one pass does: the same
 * counts, the same first kept issues with their file line numbers, the
 * same error. The file mixes every kind of line (valid text and images,
 * archive members shared by many lines, a data URL, bad JSON, a bad image,
 * a missing one, blank and CRLF lines, lines over the byte cap, a
 * byte-order mark, no final newline), and the one-pass report is checked
 * against what the generator knows it wrote. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "dataset.h"
#include "tar_put.h"

/* A fixture file's bytes (gf_read_file), NULL when it cannot be read. */
static uint8_t *slurp(const char *path, size_t *n) {
    GfError err;
    return (uint8_t *)gf_read_file(path, 1u << 20, "fixture", n, &err);
}

static char *base64(const uint8_t *b, size_t n) {
    static const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *o = malloc(4 * ((n + 2) / 3) + 1), *p = o;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)b[i] << 16 | (i + 1 < n ? (uint32_t)b[i + 1] << 8 : 0) | (i + 2 < n ? b[i + 2] : 0);
        *p++ = a[v >> 18 & 63];
        *p++ = a[v >> 12 & 63];
        *p++ = i + 1 < n ? a[v >> 6 & 63] : '=';
        *p++ = i + 2 < n ? a[v & 63] : '=';
    }
    *p = '\0';
    return o;
}

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static unsigned next(unsigned n) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (unsigned)(rng % n);
}

#define USER_IMAGE(ref) "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\",\"image\":\"" ref "\"}," \
                        "{\"type\":\"text\",\"text\":\"what is it?\"}]},{\"role\":\"assistant\",\"content\":\"a picture\"}]}"

typedef struct {
    uint64_t lines, examples, images, bad, first_bad;
} Written;

/* The JSONL of n_lines lines; what it holds in *w. */
static void write_jsonl(const char *path, int n_lines, const char *data_url, int final_newline, Written *w) {
    FILE *f = fopen(path, "wb");
    memset(w, 0, sizeof *w);
    fputs("\xEF\xBB\xBF", f); /* a byte-order mark before the first line */
    char filler[5001];
    memset(filler, 'x', 5000);
    filler[5000] = '\0';
    for (int i = 1; i <= n_lines; i++) {
        unsigned kind = i == 1 ? 0 : next(12);
        int bad = 0, images = 0;
        switch (kind) {
        case 0: case 1: case 2: fprintf(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi %d\"},{\"role\":\"assistant\",\"content\":\"ok\"}]}", i); break;
        case 3: fputs(USER_IMAGE("a.png"), f); images = 1; break;
        case 4: fputs(USER_IMAGE("dir/b.jpg"), f); images = 1; break;
        case 5: fprintf(f, USER_IMAGE("%s"), data_url); images = 1; break;
        case 6: fputs(USER_IMAGE("bad.png"), f); bad = 1; break;
        case 7: fputs(USER_IMAGE("missing.png"), f); bad = 1; break;
        case 8: fprintf(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]}", filler); bad = 1; break; /* over the cap */
        case 9: fputs("{\"messages\": [", f); bad = 1; break;
        case 10: fputs("   ", f); break; /* blank: skipped, numbered */
        default: fputs("{\"messages\":[{\"role\":\"user\",\"content\":\"crlf\"},{\"role\":\"assistant\",\"content\":\"ok\"}]}\r", f); break;
        }
        if (i < n_lines || final_newline) fputc('\n', f);
        w->lines++;
        if (bad && !w->first_bad) w->first_bad = (uint64_t)i;
        w->bad += (uint64_t)bad;
        w->examples += (uint64_t)(!bad && kind != 10);
        w->images += (uint64_t)(!bad && images);
    }
    fclose(f);
}

static int same(const DatasetReport *a, const DatasetReport *b) {
    if (a->n_lines != b->n_lines || a->n_examples != b->n_examples || a->n_images != b->n_images ||
        a->n_bad_lines != b->n_bad_lines || a->n_issues != b->n_issues)
        return 0;
    for (size_t i = 0; i < a->n_issues; i++)
        if (a->issues[i].line != b->issues[i].line || strcmp(a->issues[i].code, b->issues[i].code) ||
            strcmp(a->issues[i].message, b->issues[i].message))
            return 0;
    return 1;
}

static void check_ranges(const char *jsonl, const char *tar, DatasetLimits lim, const Written *w, const char *what) {
    DatasetReport one, many;
    GfError e1, e2;
    lim.n_threads = 1;
    GfStatus s1 = dataset_validate(jsonl, tar, &lim, &one, &e1);
    if (w) {
        CHECK(s1 == GF_UNPROCESSABLE && strcmp(e1.code, "invalid_dataset") == 0, "%s: refused for its bad lines: %s", what,
              e1.message);
        CHECK(one.n_lines == w->lines && one.n_examples == w->examples && one.n_images == w->images &&
                  one.n_bad_lines == w->bad,
              "%s: one pass counts what was written (lines %llu/%llu, examples %llu/%llu, images %llu/%llu, bad "
              "%llu/%llu)", what, (unsigned long long)one.n_lines, (unsigned long long)w->lines,
              (unsigned long long)one.n_examples, (unsigned long long)w->examples, (unsigned long long)one.n_images,
              (unsigned long long)w->images, (unsigned long long)one.n_bad_lines, (unsigned long long)w->bad);
        CHECK(one.n_issues == (w->bad < lim.max_issues_kept ? w->bad : lim.max_issues_kept) && one.n_issues &&
                  one.issues[0].line == w->first_bad,
              "%s: the first %u bad lines kept, from line %llu", what, lim.max_issues_kept,
              (unsigned long long)w->first_bad);
    }
    for (int n = 2; n <= 9; n += n < 4 ? 1 : 5) {
        lim.n_threads = n;
        GfStatus s2 = dataset_validate(jsonl, tar, &lim, &many, &e2);
        CHECK(s1 == s2 && (s1 == GF_OK || strcmp(e1.message, e2.message) == 0) &&
                  (s1 == GF_TOO_LARGE || same(&one, &many)),
              "%s: %d ranges at once report what one pass does (%s / %s)", what, n, s1 ? e1.message : "ok",
              s2 ? e2.message : "ok");
        dataset_report_free(&many);
    }
    dataset_report_free(&one);
}

int main(void) {
    char dir[] = "/tmp/gf-test-dataset-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char tar[256], jsonl[256];
    snprintf(tar, sizeof tar, "%s/images.tar", dir);
    snprintf(jsonl, sizeof jsonl, "%s/data.jsonl", dir);
    size_t na = 0, nb = 0;
    uint8_t *a = slurp(GF_FIXTURES "/images/tiny.png", &na), *b = slurp(GF_FIXTURES "/images/tall.jpg", &nb);
    CHECK(a && b, "fixture images read");
    if (!a || !b) return check_done("test_dataset");
    FILE *t = fopen(tar, "wb");
    tar_put(t, "a.png", a, na);
    tar_put(t, "dir/b.jpg", b, nb);
    tar_put(t, "bad.png", a, na / 2); /* truncated */
    tar_end(t);
    fclose(t);
    char *b64 = base64(a, na), *url = malloc(strlen(b64) + 32);
    sprintf(url, "data:image/png;base64,%s", b64);

    DatasetLimits lim;
    dataset_limits_default(&lim);
    lim.max_line_bytes = 4096;
    Written w;
    write_jsonl(jsonl, 3000, url, 1, &w);
    check_ranges(jsonl, tar, lim, &w, "3000 lines");
    lim.max_issues_kept = 7;
    check_ranges(jsonl, tar, lim, &w, "3000 lines, 7 issues kept");
    write_jsonl(jsonl, 41, url, 0, &w);
    check_ranges(jsonl, tar, lim, &w, "41 lines, no final newline");
    lim.max_examples = 100;
    write_jsonl(jsonl, 3000, url, 1, &w);
    check_ranges(jsonl, tar, lim, NULL, "over max_examples");
    DatasetReport r;
    GfError err;
    lim.n_threads = 4;
    CHECK(dataset_validate(jsonl, tar, &lim, &r, &err) == GF_TOO_LARGE && strcmp(err.code, "dataset_too_large") == 0,
          "in ranges too, more than max_examples is too large: %s", err.message);
    dataset_report_free(&r);
    dataset_limits_default(&lim);
    FILE *f = fopen(jsonl, "wb");
    for (int i = 0; i < 20; i++)
        fputs("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"ok\"}]}\n", f);
    fclose(f);
    check_ranges(jsonl, NULL, lim, NULL, "a valid file");
    lim.n_threads = 3;
    CHECK(dataset_validate(jsonl, NULL, &lim, &r, &err) == GF_OK && r.n_examples == 20 && r.n_lines == 20,
          "a valid file in three ranges: 20 examples");
    dataset_report_free(&r);
    f = fopen(jsonl, "wb");
    fclose(f);
    check_ranges(jsonl, NULL, lim, NULL, "an empty file");

    free(url);
    free(b64);
    free(a);
    free(b);
    remove(tar);
    remove(jsonl);
    rmdir(dir);
    return check_done("test_dataset");
}
