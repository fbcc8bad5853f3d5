/* test_loader.c - the example loader hands out exactly the example asked
 * for, whatever was announced: on the dense golden model with images, each
 * example the loader returns (ids, labels, pixels, positions, line) equals
 * trainset_example's own, in order with announcements (all but the first
 * prepared ahead), skipping announced ones, asking for ones never
 * announced, announcing more than the loader holds, two sets interleaved,
 * and a long random sequence of announcements and requests; an example
 * whose image is damaged fails its own request only. A set opened on
 * validated images (whose headers are probed from their first 64 KiB when
 * those hold them all) gives the examples a set that decodes them gives:
 * a 288 KB photo, a large JPEG whose EXIF orientation turns it, and one
 * whose EXIF segment lies past 64 KiB of other segments. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <turbojpeg.h>

#include "../unit/check.h"
#include "image.h"
#include "loader.h"
#include "pipeline.h"
#include "../unit/tar_put.h"

#define N 24

static const char *IMAGES[] = {"tiny.png", "wide.png", "tall.jpg", "palette.png", "gray.png", "rgba.png"};
#define N_IMAGES (int)(sizeof IMAGES / sizeof *IMAGES)

/* A fixture file's bytes (gf_read_file), NULL when it cannot be read. */
static uint8_t *slurp(const char *path, size_t *n) {
    GfError err;
    return (uint8_t *)gf_read_file(path, 1u << 20, "fixture", n, &err);
}

/* The archive of the fixture images, plus "cut.png" (the first half of
 * one) when damaged. */
static void write_tar(const char *path, int damaged) {
    FILE *f = fopen(path, "wb");
    for (int k = 0; k <= N_IMAGES; k++) {
        char src[512];
        snprintf(src, sizeof src, GF_FIXTURES "/images/%s", IMAGES[k < N_IMAGES ? k : 0]);
        size_t n = 0;
        uint8_t *b = slurp(src, &n);
        if (k == N_IMAGES) {
            if (!damaged) { free(b); break; }
            n /= 2;
        }
        tar_put(f, k < N_IMAGES ? IMAGES[k] : "cut.png", b, n);
        free(b);
    }
    tar_end(f);
    fclose(f);
}

/* Example i names one or two images (none every fifth); with `cut`, line
 * cut + 1 names the damaged one; `word` makes two sets differ. */
static void write_jsonl(const char *path, int cut, const char *word) {
    FILE *f = fopen(path, "w");
    for (int i = 0; i < N; i++) {
        fputs("{\"messages\":[{\"role\":\"user\",\"content\":[", f);
        if (i == cut) fputs("{\"type\":\"image\",\"image\":\"cut.png\"},", f);
        else if (i % 5) fprintf(f, "{\"type\":\"image\",\"image\":\"%s\"},", IMAGES[i % N_IMAGES]);
        if (i % 3 == 1) fprintf(f, "{\"type\":\"image\",\"image\":\"%s\"},", IMAGES[(i + 2) % N_IMAGES]);
        fprintf(f, "{\"type\":\"text\",\"text\":\"%s %d\"}]},{\"role\":\"assistant\",\"content\":\"%s\"}]}\n", word,
                i, i % 2 ? "red" : "blue");
    }
    fclose(f);
}

static int same_example(const TrainExample *a, const TrainExample *b, int64_t D) {
    const TrainSequence *x = &a->seq, *y = &b->seq;
    if (a->line != b->line || x->n != y->n || x->n_images != y->n_images || x->n_patches != y->n_patches) return 0;
    if (memcmp(x->ids, y->ids, (size_t)x->n * sizeof *x->ids) || memcmp(x->labels, y->labels, (size_t)x->n * sizeof *x->labels))
        return 0;
    size_t np = (size_t)(x->n_images * x->n_patches);
    return x->n_images == 0 ||
           (!memcmp(x->pixels, y->pixels, np * (size_t)D * sizeof(float)) && !memcmp(x->positions, y->positions, np * 2 * sizeof(int32_t)));
}

typedef struct {
    ExampleLoader *l;
    TrainSet *sets[2];
    TrainExample *want[2];
    int64_t D;
    int bad;                   /* requests answered with another example or an error */
} Run;

static void get(Run *r, int set, size_t i) {
    const TrainExample *ex = NULL;
    GfError err;
    if (loader_get(r->l, r->sets[set], i, &ex, &err) != GF_OK || !same_example(ex, &r->want[set][i], r->D)) {
        if (!r->bad) fprintf(stderr, "  set %d example %zu differs\n", set, i);
        r->bad++;
    }
}

static void announce(Run *r, int set, size_t from, int n) {
    for (int k = 0; k < n && from + (size_t)k < N; k++) loader_prefetch(r->l, r->sets[set], from + (size_t)k);
}

static void loader_runs(Run *r) {
    LoaderStats s0, s1;
    loader_stats(r->l, &s0);
    for (size_t i = 0; i < N; i++) { /* the trainer's pattern */
        get(r, 0, i);
        announce(r, 0, i + 1, LOADER_AHEAD);
    }
    loader_stats(r->l, &s1);
    CHECK(r->bad == 0 && s1.on_demand - s0.on_demand == 1 && s1.prefetched - s0.prefetched == N - 1,
          "in order: every example right, all but the first prepared ahead (%llu ahead, %llu on demand)",
          (unsigned long long)(s1.prefetched - s0.prefetched), (unsigned long long)(s1.on_demand - s0.on_demand));
    announce(r, 0, 0, 4);
    get(r, 0, 2); /* passes over 0 and 1 */
    get(r, 0, 0);
    get(r, 0, 3);
    announce(r, 0, 0, N); /* more than the loader holds */
    for (size_t i = 0; i < N; i++) get(r, 0, i);
    for (size_t i = 0; i < N; i++) { /* two sets interleaved */
        announce(r, 1, i, 2);
        announce(r, 0, N - 1 - i, 2);
        get(r, (int)(i % 2), i % 2 ? i : N - 1 - i);
    }
    CHECK(r->bad == 0, "skipping, unannounced, over-announced and interleaved requests: every example right (%d wrong)",
          r->bad);
    uint64_t rng = 77;
    for (int k = 0; k < 600; k++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        int set = (int)(rng >> 63);
        announce(r, set, (size_t)(rng >> 20) % N, (int)((rng >> 10) % 7));
        if ((rng >> 40) % 3) get(r, set, (size_t)(rng >> 30) % N);
    }
    CHECK(r->bad == 0, "600 random announcements and requests: every example right (%d wrong)", r->bad);
}

/* ---- large validated images ---- */

typedef struct {
    uint8_t *b;
    size_t n;
} Bytes;

static void put(Bytes *o, const void *p, size_t n) {
    o->b = realloc(o->b, o->n + n);
    memcpy(o->b + o->n, p, n);
    o->n += n;
}

/* Where the segment with marker m starts in a JPEG (from its 0xFF), or 0. */
static size_t segment_at(const uint8_t *b, size_t n, uint8_t m) {
    for (size_t pos = 2; pos + 4 <= n && b[pos] == 0xFF;) {
        if (b[pos + 1] == m) return pos;
        if (b[pos + 1] == 0xDA) return 0;
        pos += 2 + ((size_t)b[pos + 2] << 8 | b[pos + 3]);
    }
    return 0;
}

/* A 512 x 256 JPEG of noise (well over 64 KiB). */
static Bytes noise_jpeg(void) {
    int w = 512, h = 256;
    uint8_t *px = malloc((size_t)w * h * 3);
    uint64_t r = 5;
    for (size_t i = 0; i < (size_t)w * h * 3; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        px[i] = (uint8_t)(r >> 56);
    }
    tjhandle tj = tjInitCompress();
    unsigned char *jpg = NULL;
    unsigned long size = 0;
    tjCompress2(tj, px, w, 0, h, TJPF_RGB, &jpg, &size, TJSAMP_444, 95, 0);
    Bytes o = {0};
    put(&o, jpg, size);
    tjFree(jpg);
    tjDestroy(tj);
    free(px);
    return o;
}

/* The tar of photo.jpg, "turned.jpg" (the noise with orient6.jpg's EXIF
 * segment first: turned by its orientation, headers early) and "late.jpg"
 * (the same with two 40,000-byte APP2 segments and then the EXIF segment
 * just before the scan: headers past 64 KiB). */
static void write_large_tar(const char *path) {
    size_t pn = 0, en = 0;
    uint8_t *photo = slurp(GF_FIXTURES "/images/photo.jpg", &pn), *orient = slurp(GF_FIXTURES "/images/exif/orient6.jpg", &en);
    Bytes noise = noise_jpeg(), turned = {0}, late = {0};
    size_t exif = orient ? segment_at(orient, en, 0xE1) : 0, exif_len = exif ? 2 + ((size_t)orient[exif + 2] << 8 | orient[exif + 3]) : 0;
    size_t sos = segment_at(noise.b, noise.n, 0xDA);
    CHECK(photo && exif && sos, "the fixtures' segments found");
    if (!photo || !exif || !sos) exit(check_done("test_loader"));
    put(&turned, noise.b, 2);
    put(&turned, orient + exif, exif_len);
    put(&turned, noise.b + 2, noise.n - 2);
    put(&late, noise.b, sos);
    uint8_t *pad = calloc(1, 40002);
    pad[0] = 0xFF;
    pad[1] = 0xE2;
    pad[2] = 40000 >> 8;
    pad[3] = 40000 & 0xFF;
    for (int k = 0; k < 2; k++) put(&late, pad, 40002);
    put(&late, orient + exif, exif_len);
    put(&late, noise.b + sos, noise.n - sos);
    CHECK(turned.n > 65536 && image_headers_within(turned.b, 65536) && !image_headers_within(late.b, 65536) &&
              image_headers_within(late.b, late.n) && image_headers_within(photo, 65536),
          "turned.jpg's and photo.jpg's headers lie in their first 64 KiB, late.jpg's past them");
    FILE *f = fopen(path, "wb");
    const char *names[] = {"photo.jpg", "turned.jpg", "late.jpg"};
    const Bytes files[] = {{photo, pn}, turned, late};
    for (int k = 0; k < 3; k++) tar_put(f, names[k], files[k].b, files[k].n);
    tar_end(f);
    fclose(f);
    free(photo); free(orient); free(noise.b); free(turned.b); free(late.b); free(pad);
}

static void check_large_images(Pipeline *p, const char *dir, int64_t D) {
    char tar[300], jsonl[300];
    snprintf(tar, sizeof tar, "%s/large.tar", dir);
    snprintf(jsonl, sizeof jsonl, "%s/large.jsonl", dir);
    write_large_tar(tar);
    FILE *f = fopen(jsonl, "w");
    const char *names[] = {"photo.jpg", "turned.jpg", "late.jpg"};
    for (int i = 0; i < 3; i++)
        fprintf(f, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\",\"image\":\"%s\"},"
                   "{\"type\":\"text\",\"text\":\"what is it\"}]},{\"role\":\"assistant\",\"content\":\"noise\"}]}\n",
                names[i]);
    fclose(f);
    ImageLimits lim = {20u << 20, 50000000};
    GfError err;
    TrainSet *decoded = NULL, *validated = NULL;
    CHECK_STATUS(trainset_open(p, jsonl, tar, 4096, &lim, TRAINSET_DECODE_IMAGES, &decoded, &err), GF_OK, err);
    CHECK_STATUS(trainset_open(p, jsonl, tar, 4096, &lim, TRAINSET_IMAGES_VALIDATED, &validated, &err), GF_OK, err);
    for (size_t i = 0; decoded && validated && i < 3; i++) {
        TrainExample a = {0}, b = {0}; /* zeroed before first use (trainset.h) */
        CHECK_STATUS(trainset_example(decoded, i, &a, &err), GF_OK, err);
        CHECK_STATUS(trainset_example(validated, i, &b, &err), GF_OK, err);
        CHECK(same_example(&a, &b, D), "%s: probed from its headers, the example a decoded one is (%lld and %lld tokens)",
              names[i], (long long)a.seq.n, (long long)b.seq.n);
        train_example_free(&a);
        train_example_free(&b);
    }
    trainset_close(decoded);
    trainset_close(validated);
    remove(tar);
    remove(jsonl);
}

int main(void) {
    char dir[] = "/tmp/gf-loader-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char tar[256], jsonl[3][256];
    snprintf(tar, sizeof tar, "%s/images.tar", dir);
    write_tar(tar, 1);
    for (int s = 0; s < 2; s++) {
        snprintf(jsonl[s], sizeof jsonl[s], "%s/data%d.jsonl", dir, s);
        write_jsonl(jsonl[s], -1, s ? "a photo of a small thing" : "picture");
    }
    GfError err;
    Pipeline *p = NULL;
    ModelOptions mo = {.n_threads = 2};
    ImageLimits lim = {20u << 20, 50000000};
    CHECK_STATUS(pipeline_open(GF_FIXTURES "/dense", &mo, &p, &err), GF_OK, err);
    if (!p) return check_done("test_loader");
    Run r = {0};
    r.D = 3 * (int64_t)p->pre.patch_size * p->pre.patch_size;
    for (int s = 0; s < 2; s++) {
        CHECK_STATUS(trainset_open(p, jsonl[s], tar, 4096, &lim, TRAINSET_DECODE_IMAGES, &r.sets[s], &err), GF_OK, err);
        r.want[s] = calloc(N, sizeof *r.want[s]);
        for (size_t i = 0; r.sets[s] && i < N; i++) CHECK_STATUS(trainset_example(r.sets[s], i, &r.want[s][i], &err), GF_OK, err);
    }
    CHECK_STATUS(loader_start(&r.l, &err), GF_OK, err);
    if (r.sets[0] && r.sets[1] && r.l) loader_runs(&r);

    /* a damaged image fails the request for its example only */
    snprintf(jsonl[2], sizeof jsonl[2], "%s/cut.jsonl", dir);
    write_jsonl(jsonl[2], 7, "picture");
    TrainSet *cut = NULL;
    CHECK_STATUS(trainset_open(p, jsonl[2], tar, 4096, &lim, TRAINSET_IMAGES_VALIDATED, &cut, &err), GF_OK, err);
    const TrainExample *ex;
    int ok = 1;
    for (size_t i = 0; cut && r.l && i < N; i++) {
        GfStatus st = loader_get(r.l, cut, i, &ex, &err);
        announce(&(Run){.l = r.l, .sets = {cut, cut}}, 0, i + 1, LOADER_AHEAD);
        ok &= i == 7 ? st == GF_UNPROCESSABLE && strstr(err.message, "line 8: image 'cut.png'") != NULL : st == GF_OK;
    }
    CHECK(ok, "the damaged example's request fails naming its line and image, the others succeed: %s", err.message);
    trainset_close(cut);
    check_large_images(p, dir, r.D);

    loader_stop(r.l);
    for (int s = 0; s < 2; s++) {
        for (size_t i = 0; r.want[s] && i < N; i++) train_example_free(&r.want[s][i]);
        free(r.want[s]);
        trainset_close(r.sets[s]);
    }
    pipeline_close(p);
    remove(tar);
    for (int k = 0; k < 3; k++) remove(jsonl[k]);
    rmdir(dir);
    return check_done("test_loader");
}
