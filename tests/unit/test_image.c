/* test_image.c - PNG/JPEG decoding: the fixture images decode to the sizes
 * the reference lists, gray and palette images convert to RGB as PIL does,
 * and caps are enforced from the header; image_headers_within says a
 * prefix holds the headers from the first length on where it does, and
 * the probe of that shortest prefix is the whole file's. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "image.h"

#include <png.h>
#include <zlib.h>
#include <turbojpeg.h>

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n);
    if (fread(b, 1, *n, f) != *n) { free(b); b = NULL; }
    fclose(f);
    return b;
}

static const ImageLimits LIM = {20u << 20, 50000000};

static void decode_fixture(const char *name, int w, int h, int gray) {
    char path[512];
    snprintf(path, sizeof path, GF_FIXTURES "/images/%s", name);
    size_t n = 0;
    uint8_t *b = slurp(path, &n);
    CHECK(b != NULL, "read %s", name);
    if (!b) return;
    Image img;
    GfError err;
    CHECK_STATUS(image_decode(b, n, &LIM, &img, &err), GF_OK, err);
    CHECK(img.width == w && img.height == h, "%s: %dx%d, want %dx%d", name, img.width, img.height, w, h);
    if (gray && img.rgb) {
        int same = 1;
        for (size_t i = 0; i < (size_t)w * h; i++)
            same &= img.rgb[3 * i] == img.rgb[3 * i + 1] && img.rgb[3 * i] == img.rgb[3 * i + 2];
        CHECK(same, "%s: gray replicated to R=G=B", name);
    }
    ImageLimits small = {LIM.max_bytes, (uint64_t)w * h - 1};
    Image none;
    CHECK(image_decode(b, n, &small, &none, &err) == GF_INVALID && strcmp(err.code, "image_too_large") == 0,
          "%s: pixel cap", name);
    ImageLimits tiny = {n - 1, LIM.max_pixels};
    CHECK(image_decode(b, n, &tiny, &none, &err) == GF_TOO_LARGE, "%s: byte cap", name);
    CHECK(image_decode(b, n / 2, &LIM, &none, &err) == GF_INVALID && none.rgb == NULL, "%s: truncated", name);
    int pw = -1, ph = -1;
    CHECK_STATUS(image_probe(b, n, &LIM, &pw, &ph, &err), GF_OK, err);
    CHECK(pw == w && ph == h, "%s: probed %dx%d, want %dx%d", name, pw, ph, w, h);
    CHECK(image_probe(b, n / 2, &LIM, &pw, &ph, &err) == GF_OK && pw == w && ph == h,
          "%s: the headers of a truncated file probe (%dx%d)", name, pw, ph);
    CHECK(image_probe(b, n, &small, &pw, &ph, &err) == GF_INVALID && strcmp(err.code, "image_too_large") == 0 &&
              pw == 0 && ph == 0, "%s: probe checks the pixel cap", name);
    CHECK(image_probe(b, n, &tiny, &pw, &ph, &err) == GF_TOO_LARGE, "%s: probe checks the byte cap", name);
    CHECK(image_probe(b, 20, &LIM, &pw, &ph, &err) == GF_INVALID && strcmp(err.code, "invalid_image") == 0,
          "%s: 20 bytes hold no header: %s", name, err.message);
    image_free(&img);
    free(b);
}

/* A w x h RGB test pattern. */
static uint8_t *pattern(int w, int h) {
    uint8_t *p = malloc((size_t)w * h * 3);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t *px = p + ((size_t)y * w + x) * 3;
            px[0] = (uint8_t)(x * 9); px[1] = (uint8_t)(y * 5); px[2] = (uint8_t)(x * y);
        }
    return p;
}

typedef struct { uint8_t *buf; size_t n, cap; } MemOut;

static void mem_write(png_structp png, png_bytep data, png_size_t len) {
    MemOut *m = png_get_io_ptr(png);
    if (m->n + len > m->cap) { m->cap = (m->n + len) * 2; m->buf = realloc(m->buf, m->cap); }
    memcpy(m->buf + m->n, data, len);
    m->n += len;
}
static void mem_flush(png_structp png) { (void)png; }

/* An RGB PNG, Adam7-interlaced or not, written with libpng. */
static MemOut write_png(const uint8_t *rgb, int w, int h, int interlace) {
    MemOut m = {0};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    png_set_write_fn(png, &m, mem_write, mem_flush);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, PNG_COLOR_TYPE_RGB,
                 interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_bytep *rows = malloc(sizeof(png_bytep) * (size_t)h);
    for (int y = 0; y < h; y++) rows[y] = (png_bytep)rgb + (size_t)y * w * 3;
    png_set_rows(png, info, rows);
    png_write_png(png, info, PNG_TRANSFORM_IDENTITY, NULL);
    png_destroy_write_struct(&png, &info);
    free(rows);
    return m;
}

static void test_interlaced_png(void) {
    int w = 37, h = 23;
    uint8_t *rgb = pattern(w, h);
    MemOut plain = write_png(rgb, w, h, 0), adam7 = write_png(rgb, w, h, 1);
    Image a, b;
    GfError err;
    CHECK_STATUS(image_decode(plain.buf, plain.n, &LIM, &a, &err), GF_OK, err);
    CHECK_STATUS(image_decode(adam7.buf, adam7.n, &LIM, &b, &err), GF_OK, err);
    CHECK(a.rgb && b.rgb && memcmp(a.rgb, rgb, (size_t)w * h * 3) == 0 && memcmp(b.rgb, rgb, (size_t)w * h * 3) == 0,
          "interlaced and plain PNG decode to the same pixels");
    image_free(&a);
    image_free(&b);
    free(plain.buf);
    free(adam7.buf);
    free(rgb);
}

/* A JPEG from TurboJPEG: pixel format RGB or CMYK, optionally progressive. */
static unsigned char *write_jpeg(const uint8_t *px, int w, int h, int cmyk, unsigned long *size) {
    tjhandle tj = tjInitCompress();
    unsigned char *out = NULL;
    *size = 0;
    int rc = tjCompress2(tj, px, w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB, &out, size, cmyk ? TJSAMP_444 : TJSAMP_420, 90, 0);
    tjDestroy(tj);
    return rc == 0 ? out : NULL;
}

static unsigned char *make_progressive(const unsigned char *jpeg, unsigned long n, unsigned long *size) {
    tjhandle tj = tjInitTransform();
    unsigned char *out = NULL;
    tjtransform xf;
    memset(&xf, 0, sizeof xf);
    xf.options = TJXOPT_PROGRESSIVE;
    *size = 0;
    int rc = tjTransform(tj, jpeg, n, 1, &out, size, &xf, 0);
    tjDestroy(tj);
    return rc == 0 ? out : NULL;
}

static void test_jpeg_variants(void) {
    int w = 48, h = 32;
    uint8_t *rgb = pattern(w, h);
    unsigned long n = 0, pn = 0;
    unsigned char *base = write_jpeg(rgb, w, h, 0, &n);
    unsigned char *prog = base ? make_progressive(base, n, &pn) : NULL;
    CHECK(prog != NULL, "progressive JPEG written");
    Image a, b;
    GfError err;
    CHECK_STATUS(image_decode(base, n, &LIM, &a, &err), GF_OK, err);
    if (prog) CHECK_STATUS(image_decode(prog, pn, &LIM, &b, &err), GF_OK, err);
    CHECK(prog && a.rgb && b.rgb && memcmp(a.rgb, b.rgb, (size_t)w * h * 3) == 0, "progressive decodes like baseline");
    /* a scan bomb: the last scan repeated thousands of times before EOI */
    if (prog) {
        size_t last_sos = 0;
        for (size_t i = 0; i + 1 < pn; i++)
            if (prog[i] == 0xFF && prog[i + 1] == 0xDA) last_sos = i;
        CHECK(last_sos > 0 && last_sos + 2 < pn && pn < (1u << 20), "the progressive JPEG has a last scan");
        size_t scan_len = last_sos + 2 < pn ? pn - 2 - last_sos : 0, reps = 5000, bn = last_sos + scan_len * reps + 2;
        unsigned char *bomb = malloc(bn < (1u << 30) ? bn : 1);
        memcpy(bomb, prog, last_sos);
        for (size_t r = 0; r < reps; r++) memcpy(bomb + last_sos + r * scan_len, prog + last_sos, scan_len);
        bomb[bn - 2] = 0xFF;
        bomb[bn - 1] = 0xD9;
        Image c;
        double t0 = gf_time_mono();
        GfStatus st = image_decode(bomb, bn, &LIM, &c, &err);
        double dt = gf_time_mono() - t0;
        CHECK(st == GF_INVALID && strcmp(err.code, "invalid_image") == 0 && c.rgb == NULL, "scan bomb refused (%s)", err.message);
        CHECK(dt < 1.0, "scan bomb refused in %.2f s", dt);
        free(bomb);
    }
    /* CMYK: an all-zero-ink (inverted: 255) image is white */
    uint8_t *cmyk = malloc((size_t)w * h * 4);
    memset(cmyk, 255, (size_t)w * h * 4);
    unsigned long cn = 0;
    unsigned char *cj = write_jpeg(cmyk, w, h, 1, &cn);
    Image c;
    CHECK(cj && image_decode(cj, cn, &LIM, &c, &err) == GF_OK, "CMYK JPEG decodes: %s", err.message);
    if (cj && c.rgb) CHECK(c.rgb[0] >= 250 && c.rgb[1] >= 250 && c.rgb[2] >= 250, "CMYK white is white (%d %d %d)", c.rgb[0], c.rgb[1], c.rgb[2]);
    image_free(&a);
    image_free(&b);
    image_free(&c);
    tjFree(base);
    tjFree(prog);
    tjFree(cj);
    free(cmyk);
    free(rgb);
}

/* EXIF orientation: each tagged file decodes to what PIL's exif_transpose
 * gives (tools/gen_exif_fixtures.py), saved losslessly as PNG. The JPEGs are
 * decoded by the same libjpeg-turbo PIL uses, so values are equal. */
static void test_exif_orientation(void) {
    const char *names[] = {"orient1.jpg", "orient2.jpg", "orient3.jpg", "orient4.jpg", "orient5.jpg",
                           "orient6.jpg", "orient7.jpg", "orient8.jpg", "orient6.png"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char path[512], want_path[600];
        snprintf(path, sizeof path, GF_FIXTURES "/images/exif/%s", names[i]);
        if (strstr(names[i], ".png")) snprintf(want_path, sizeof want_path, "%s.expected.png", path);
        else snprintf(want_path, sizeof want_path, GF_FIXTURES "/images/exif/%.7s.expected.png", names[i]);
        size_t n = 0, wn = 0;
        uint8_t *b = slurp(path, &n), *wb = slurp(want_path, &wn);
        CHECK(b && wb, "read %s and its expected picture", names[i]);
        Image got, want;
        GfError err;
        if (b && wb && image_decode(b, n, &LIM, &got, &err) == GF_OK) {
            CHECK_STATUS(image_decode(wb, wn, &LIM, &want, &err), GF_OK, err);
            int same_size = got.width == want.width && got.height == want.height;
            CHECK(same_size, "%s: %dx%d, PIL gives %dx%d", names[i], got.width, got.height, want.width, want.height);
            int maxd = 0;
            for (size_t k = 0; same_size && k < (size_t)got.width * got.height * 3; k++) {
                int d = abs((int)got.rgb[k] - (int)want.rgb[k]);
                if (d > maxd) maxd = d;
            }
            CHECK(same_size && maxd == 0, "%s: pixels equal PIL's exif_transpose (max diff %d)", names[i], maxd);
            int pw = 0, ph = 0;
            CHECK(image_probe(b, n, &LIM, &pw, &ph, &err) == GF_OK && pw == want.width && ph == want.height,
                  "%s: probed %dx%d, upright %dx%d", names[i], pw, ph, want.width, want.height);
            image_free(&got);
            image_free(&want);
        } else {
            CHECK(0, "%s decodes", names[i]);
        }
        free(b);
        free(wb);
    }
}

/* ---- PNG bombs ---- */

/* An 8-bit RGB PNG of w x h whose image data is the zlib stream of `raw`
 * bytes of zeros (filter 0, black rows, then whatever is over). */
static MemOut bomb_png(uint32_t w, uint32_t h, size_t raw) {
    MemOut m = {0};
    uint8_t *zeros = calloc(raw, 1);
    uLongf clen = compressBound(raw);
    uint8_t *z = malloc(clen);
    compress2(z, &clen, zeros, raw, 9);
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t ihdr[13] = {(uint8_t)(w >> 24), (uint8_t)(w >> 16), (uint8_t)(w >> 8), (uint8_t)w,
                        (uint8_t)(h >> 24), (uint8_t)(h >> 16), (uint8_t)(h >> 8), (uint8_t)h, 8, 2, 0, 0, 0};
    const struct { const char *type; const uint8_t *data; uint32_t len; } chunks[3] = {
        {"IHDR", ihdr, 13}, {"IDAT", z, (uint32_t)clen}, {"IEND", NULL, 0}};
    m.cap = 64 + clen;
    m.buf = malloc(m.cap);
    memcpy(m.buf, sig, 8);
    m.n = 8;
    for (int i = 0; i < 3; i++) {
        uint32_t len = chunks[i].len;
        uint8_t *o = m.buf + m.n;
        o[0] = (uint8_t)(len >> 24); o[1] = (uint8_t)(len >> 16); o[2] = (uint8_t)(len >> 8); o[3] = (uint8_t)len;
        memcpy(o + 4, chunks[i].type, 4);
        if (len) memcpy(o + 8, chunks[i].data, len);
        uLong crc = crc32(0, o + 4, 4 + len);
        o[8 + len] = (uint8_t)(crc >> 24); o[9 + len] = (uint8_t)(crc >> 16);
        o[10 + len] = (uint8_t)(crc >> 8); o[11 + len] = (uint8_t)crc;
        m.n += 12 + len;
    }
    free(zeros);
    free(z);
    return m;
}

/* Image data larger than the header's image needs is refused before
 * libpng inflates it: a 1 x 1 image with 64 MiB of zeros behind it
 * (compressed past any 1 x 1 image's bound) and a 300 x 300 one whose small
 * stream inflates to 64 MiB (past its 270,300 raw bytes); the same image
 * with exactly its rows decodes. */
static void test_png_bombs(void) {
    Image img;
    GfError err;
    size_t big = (size_t)64 << 20;
    MemOut a = bomb_png(1, 1, big), b = bomb_png(300, 300, big), c = bomb_png(300, 300, 300 * (1 + 900));
    CHECK(image_decode(a.buf, a.n, &LIM, &img, &err) == GF_INVALID && strstr(err.message, "compressed image data"),
          "1x1 with 64 MiB behind it: %s", err.message);
    CHECK(image_decode(b.buf, b.n, &LIM, &img, &err) == GF_INVALID && strstr(err.message, "inflates past the 270300 bytes"),
          "300x300 inflating to 64 MiB: %s", err.message);
    GfStatus st = image_decode(c.buf, c.n, &LIM, &img, &err);
    CHECK(st == GF_OK && img.width == 300 && img.height == 300 && img.rgb[0] == 0, "the honest one decodes: %s",
          st ? err.message : "ok");
    if (!st) image_free(&img);
    free(a.buf);
    free(b.buf);
    free(c.buf);
}

/* For the fixture images: image_headers_within is 0 below some length k0
 * and 1 from k0 to the whole file, and the probe of the first k0 bytes
 * gives the whole file's size (for the EXIF ones, turned). */
static void test_headers_within(void) {
    const char *names[] = {"exact.png", "gray.png", "palette.png", "rgba.png", "tiny.png", "wide.png", "tall.jpg",
                           "photo.jpg", "exif/orient1.jpg", "exif/orient6.jpg", "exif/orient8.jpg", "exif/orient6.png"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char path[512];
        snprintf(path, sizeof path, GF_FIXTURES "/images/%s", names[i]);
        size_t n = 0, k0 = 0;
        uint8_t *b = slurp(path, &n);
        CHECK(b != NULL, "read %s", names[i]);
        if (!b) continue;
        while (k0 <= n && !image_headers_within(b, k0)) k0++;
        int monotone = 1;
        for (size_t k = k0; k <= n; k++) monotone &= image_headers_within(b, k);
        int w = 0, h = 0, pw = -1, ph = -1;
        GfError err;
        CHECK_STATUS(image_probe(b, n, &LIM, &w, &h, &err), GF_OK, err);
        GfStatus st = k0 <= n ? image_probe(b, k0, &LIM, &pw, &ph, &err) : GF_INVALID;
        CHECK(k0 <= n && monotone && st == GF_OK && pw == w && ph == h,
              "%s: its headers end at byte %zu of %zu, and probing them gives %dx%d as the whole file does (%dx%d)",
              names[i], k0, n, pw, ph, w, h);
        free(b);
    }
    CHECK(!image_headers_within((const uint8_t *)"GIF89a....", 10) && !image_headers_within((const uint8_t *)"", 0),
          "neither PNG nor JPEG: no headers within");
}

int main(void) {
    test_headers_within();
    test_png_bombs();
    test_exif_orientation();
    test_interlaced_png();
    test_jpeg_variants();
    /* sizes from shared/golden/image_processor/index.json */
    decode_fixture("exact.png", 144, 96, 0);
    decode_fixture("gray.png", 150, 150, 1);
    decode_fixture("palette.png", 222, 111, 0);
    decode_fixture("rgba.png", 181, 97, 0);
    decode_fixture("tiny.png", 20, 31, 0);
    decode_fixture("wide.png", 300, 200, 0);
    decode_fixture("tall.jpg", 127, 333, 0);
    decode_fixture("photo.jpg", 1280, 720, 0);
    Image img;
    GfError err;
    CHECK(image_decode((const uint8_t *)"GIF89a....", 10, &LIM, &img, &err) == GF_UNSUPPORTED, "gif");
    CHECK(image_decode((const uint8_t *)"", 0, &LIM, &img, &err) == GF_INVALID, "empty");
    int pw, ph;
    CHECK(image_probe((const uint8_t *)"GIF89a....", 10, &LIM, &pw, &ph, &err) == GF_UNSUPPORTED, "probe: gif");
    CHECK(image_probe((const uint8_t *)"", 0, &LIM, &pw, &ph, &err) == GF_INVALID, "probe: empty");
    return check_done("test_image");
}
