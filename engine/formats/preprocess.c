/* preprocess.c - Gemma4ImageProcessorPil in C: target size, PIL's integer
 * bicubic resampling (Pillow Resample.c), patches and positions. */
#include "preprocess.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS 22   /* Pillow: 32 - 8 - 2 */

GfStatus preprocess_target_size(const PreprocessConfig *cfg, int w, int h, int *tw, int *th, GfError *err) {
    int b = cfg->max_soft_tokens;
    if (b != 70 && b != 140 && b != 280 && b != 560 && b != 1120)
        return gf_error_set(err, GF_INVALID, "invalid_value", "max_soft_tokens",
                            "the soft-token budget must be 70, 140, 280, 560 or 1120 (got %d)", b);
    if (w <= 0 || h <= 0) return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "image has a zero side");
    int64_t k2 = (int64_t)cfg->pooling_kernel * cfg->pooling_kernel, p = cfg->patch_size;
    int64_t side = p * cfg->pooling_kernel, max_patches = k2 * b;
    double f = sqrt((double)max_patches * (double)(p * p) / ((double)h * (double)w));
    int64_t y = (int64_t)floor(f * h / (double)side) * side, x = (int64_t)floor(f * w / (double)side) * side;
    int64_t max_side = max_patches / k2 * side;
    if (y == 0 && x == 0)
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "a %dx%d image is too small to process", w, h);
    if (y == 0) {
        y = side;
        x = (int64_t)(w / h) * side;
        if (x > max_side) x = max_side;
    } else if (x == 0) {
        x = side;
        y = (int64_t)(h / w) * side;
        if (y > max_side) y = max_side;
    }
    if (x * y > max_patches * p * p)
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "a %dx%d image does not fit the budget of %d soft tokens", w, h, b);
    *tw = (int)x;
    *th = (int)y;
    return GF_OK;
}

/* ---- PIL bicubic ------------------------------------------------------------- */

static double bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

typedef struct {
    int ksize;
    int *bounds;      /* [out][2]: first input index, count */
    int32_t *k;       /* [out][ksize] fixed-point weights */
} Coeffs;

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis. */
static int coeffs_init(Coeffs *c, int in_size, int out_size) {
    double scale = (double)in_size / out_size, fscale = scale < 1.0 ? 1.0 : scale, support = 2.0 * fscale;
    c->ksize = (int)ceil(support) * 2 + 1;
    c->bounds = gf_malloc((size_t)out_size * 2 * sizeof *c->bounds, NULL);
    c->k = gf_calloc((size_t)out_size * (size_t)c->ksize, sizeof *c->k, NULL);
    double *w = gf_malloc((size_t)c->ksize * sizeof *w, NULL);
    if (!c->bounds || !c->k || !w) { free(w); return -1; }
    for (int o = 0; o < out_size; o++) {
        double center = (o + 0.5) * scale, sum = 0.0, ss = 1.0 / fscale;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        int n = hi - lo;
        for (int x = 0; x < n; x++) sum += (w[x] = bicubic((x + lo - center + 0.5) * ss));
        for (int x = 0; x < n; x++) {
            double v = sum != 0.0 ? w[x] / sum : w[x];
            c->k[(size_t)o * c->ksize + x] = (int32_t)(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
        }
        c->bounds[2 * o] = lo;
        c->bounds[2 * o + 1] = n;
    }
    free(w);
    return 0;
}

static void coeffs_free(Coeffs *c) {
    free(c->bounds);
    free(c->k);
}

static uint8_t clip8(int32_t v) {
    if (v >= (1 << PRECISION_BITS << 8)) return 255;
    if (v <= 0) return 0;
    return (uint8_t)(v >> PRECISION_BITS);
}

/* One pass along x (horizontal = 1) or y, RGB rows of 3 bytes per pixel. */
static void resample_pass(const uint8_t *in, int in_w, int in_h, uint8_t *out, int out_w, int out_h, const Coeffs *c,
                          int horizontal) {
    for (int y = 0; y < out_h; y++)
        for (int x = 0; x < out_w; x++) {
            int o = horizontal ? x : y, lo = c->bounds[2 * o], n = c->bounds[2 * o + 1];
            const int32_t *k = c->k + (size_t)o * c->ksize;
            for (int ch = 0; ch < 3; ch++) {
                int32_t acc = 1 << (PRECISION_BITS - 1);
                for (int i = 0; i < n; i++) {
                    size_t src = horizontal ? ((size_t)y * in_w + (size_t)(lo + i)) : ((size_t)(lo + i) * in_w + (size_t)x);
                    acc += (int32_t)in[src * 3 + ch] * k[i];
                }
                out[((size_t)y * out_w + x) * 3 + ch] = clip8(acc);
            }
        }
    (void)in_h;
}

GfStatus preprocess_resize_bicubic(const Image *in, int tw, int th, Image *out, GfError *err) {
    memset(out, 0, sizeof *out);
    uint8_t *cur = gf_malloc((size_t)in->width * in->height * 3, NULL);
    if (!cur) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    memcpy(cur, in->rgb, (size_t)in->width * in->height * 3);
    int w = in->width, h = in->height;
    for (int pass = 0; pass < 2; pass++) {
        int horizontal = pass == 0, n_in = horizontal ? w : h, n_out = horizontal ? tw : th;
        if (n_in == n_out) continue;
        Coeffs c;
        int nw = horizontal ? tw : w, nh = horizontal ? h : th;
        uint8_t *next = gf_malloc((size_t)nw * nh * 3, NULL);
        if (!next || coeffs_init(&c, n_in, n_out)) {
            free(next);
            free(cur);
            return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
        }
        resample_pass(cur, w, h, next, nw, nh, &c, horizontal);
        coeffs_free(&c);
        free(cur);
        cur = next;
        w = nw;
        h = nh;
    }
    out->width = w;
    out->height = h;
    out->rgb = cur;
    return GF_OK;
}

/* ---- patches ------------------------------------------------------------------ */

int64_t preprocess_patchify(const Image *img, int p, int64_t max_patches, uint8_t *pixels, int32_t *positions) {
    int64_t wp = img->width / p, hp = img->height / p, n = 0, row = 3 * (int64_t)p * p;
    memset(pixels, 0, (size_t)(max_patches * row));
    for (int64_t py = 0; py < hp; py++)
        for (int64_t px = 0; px < wp && n < max_patches; px++, n++) {
            uint8_t *dst = pixels + n * row;
            for (int y = 0; y < p; y++)
                memcpy(dst + (int64_t)y * p * 3, img->rgb + (((py * p + y) * img->width) + px * p) * 3, (size_t)p * 3);
            positions[2 * n] = (int32_t)px;
            positions[2 * n + 1] = (int32_t)py;
        }
    for (int64_t i = n; i < max_patches; i++) positions[2 * i] = positions[2 * i + 1] = -1;
    return n;
}

GfStatus preprocess_image(const PreprocessConfig *cfg, const Image *img, uint8_t *pixels, int32_t *positions,
                          int64_t *n_real, int64_t *n_soft, GfError *err) {
    int tw = 0, th = 0;
    GfStatus st = preprocess_target_size(cfg, img->width, img->height, &tw, &th, err);
    if (st) return st;
    Image resized;
    if ((st = preprocess_resize_bicubic(img, tw, th, &resized, err))) return st;
    int64_t k2 = (int64_t)cfg->pooling_kernel * cfg->pooling_kernel;
    *n_real = preprocess_patchify(&resized, cfg->patch_size, preprocess_max_patches(cfg), pixels, positions);
    *n_soft = *n_real / k2;
    image_free(&resized);
    return GF_OK;
}

int64_t preprocess_max_patches(const PreprocessConfig *cfg) {
    return (int64_t)cfg->pooling_kernel * cfg->pooling_kernel * cfg->max_soft_tokens;
}

GfStatus preprocess_image_f32(const PreprocessConfig *cfg, const Image *img, float *pixels, int32_t *positions,
                              int64_t *n_real, int64_t *n_soft, GfError *err) {
    int64_t n = preprocess_max_patches(cfg) * 3 * cfg->patch_size * cfg->patch_size;
    uint8_t *u8 = gf_malloc((size_t)n, err);
    if (!u8) return GF_NO_MEMORY;
    GfStatus st = preprocess_image(cfg, img, u8, positions, n_real, n_soft, err);
    for (int64_t i = 0; !st && i < n; i++) pixels[i] = (float)u8[i] / 255.0f;
    free(u8);
    return st;
}
