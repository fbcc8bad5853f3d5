/* image.c - libpng and TurboJPEG decoding behind caps. */
#include "image.h"

#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>
#include <zlib.h>

ImageFormat image_sniff(const uint8_t *b, size_t n) {
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n >= 8 && memcmp(b, png_sig, 8) == 0) return IMAGE_FORMAT_PNG;
    if (n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) return IMAGE_FORMAT_JPEG;
    return IMAGE_FORMAT_UNKNOWN;
}

void image_free(Image *img) {
    if (!img) return;
    free(img->rgb);
    memset(img, 0, sizeof *img);
}

static GfStatus check_dims(uint64_t w, uint64_t h, const ImageLimits *lim, GfError *err) {
    if (w == 0 || h == 0)
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "image has a zero width or height");
    if (w * h > lim->max_pixels) /* w, h < 2^32 so the product fits */
        return gf_error_set(err, GF_INVALID, "image_too_large", NULL,
                            "image is %llux%llu pixels, over the cap of %llu pixels",
                            (unsigned long long)w, (unsigned long long)h,
                            (unsigned long long)lim->max_pixels);
    return GF_OK;
}

/* ---- EXIF orientation ---------------------------------------------------- */

static uint32_t tiff_u(const uint8_t *p, int size, int big) {
    uint32_t v = 0;
    for (int i = 0; i < size; i++) v |= (uint32_t)p[big ? i : size - 1 - i] << (8 * (size - 1 - i));
    return v;
}

/* The Orientation tag (0x0112) of IFD0 in a TIFF block; 1 when absent,
 * malformed or out of 1..8 (PIL then leaves the image as it is). */
static int tiff_orientation(const uint8_t *t, size_t n) {
    if (n < 8) return 1;
    int big = t[0] == 'M' && t[1] == 'M';
    if (!big && !(t[0] == 'I' && t[1] == 'I')) return 1;
    if (tiff_u(t + 2, 2, big) != 42) return 1;
    uint32_t ifd = tiff_u(t + 4, 4, big);
    if (ifd > n || n - ifd < 2) return 1;
    uint32_t count = tiff_u(t + ifd, 2, big);
    for (uint32_t i = 0; i < count; i++) {
        size_t e = (size_t)ifd + 2 + 12 * (size_t)i;
        if (e + 12 > n) return 1;
        if (tiff_u(t + e, 2, big) != 0x0112) continue;
        uint32_t type = tiff_u(t + e + 2, 2, big), v = 0;
        if (type == 3) v = tiff_u(t + e + 8, 2, big);       /* SHORT */
        else if (type == 4) v = tiff_u(t + e + 8, 4, big);  /* LONG */
        return v >= 1 && v <= 8 ? (int)v : 1;
    }
    return 1;
}

/* Walks the JPEG markers up to the first scan for an APP1 "Exif" segment. */
static int jpeg_orientation(const uint8_t *b, size_t n) {
    size_t pos = 2;
    while (pos + 4 <= n && b[pos] == 0xFF) {
        uint8_t m = b[pos + 1];
        if (m == 0xFF) { pos++; continue; }                        /* fill byte */
        if (m == 0xD8 || m == 0x01 || (m >= 0xD0 && m <= 0xD7)) { pos += 2; continue; }
        if (m == 0xDA || m == 0xD9) break;
        size_t len = (size_t)b[pos + 2] << 8 | b[pos + 3];
        if (len < 2 || len > n - pos - 2) break;
        if (m == 0xE1 && len >= 8 && memcmp(b + pos + 4, "Exif\0\0", 6) == 0) return tiff_orientation(b + pos + 10, len - 8);
        pos += 2 + len;
    }
    return 1;
}

/* PIL's ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
 * 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise. */
static GfStatus apply_orientation(Image *img, int o, GfError *err) {
    if (o <= 1 || o > 8) return GF_OK;
    int W = img->width, H = img->height, swap = o >= 5;
    int dw = swap ? H : W, dh = swap ? W : H;
    uint8_t *dst = gf_malloc((size_t)W * H * 3, NULL);
    if (!dst) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    for (int y = 0; y < dh; y++) {
        for (int x = 0; x < dw; x++) {
            int sx, sy;
            switch (o) {
            case 2: sx = W - 1 - x; sy = y; break;
            case 3: sx = W - 1 - x; sy = H - 1 - y; break;
            case 4: sx = x; sy = H - 1 - y; break;
            case 5: sx = y; sy = x; break;
            case 6: sx = y; sy = H - 1 - x; break;
            case 7: sx = W - 1 - y; sy = H - 1 - x; break;
            default: sx = W - 1 - y; sy = x; break;
            }
            memcpy(dst + ((size_t)y * dw + x) * 3, img->rgb + ((size_t)sy * W + sx) * 3, 3);
        }
    }
    free(img->rgb);
    img->rgb = dst;
    img->width = dw;
    img->height = dh;
    return GF_OK;
}

/* ---- PNG --------------------------------------------------------------- */

typedef struct {
    const uint8_t *data;
    size_t n, pos;
    char message[200];
} PngSrc;

static void png_read_mem(png_structp png, png_bytep out, png_size_t len) {
    PngSrc *src = png_get_io_ptr(png);
    if (len > src->n - src->pos) png_error(png, "truncated file");
    memcpy(out, src->data + src->pos, len);
    src->pos += len;
}

static void png_on_error(png_structp png, png_const_charp msg) {
    PngSrc *src = png_get_error_ptr(png);
    snprintf(src->message, sizeof src->message, "%s", msg);
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

/* eXIf before the image data (the TIFF block without the "Exif" prefix). */
static int png_exif_orientation(png_structp png, png_infop info) {
    png_uint_32 n = 0;
    png_bytep exif = NULL;
    if (!png_get_eXIf_1(png, info, &n, &exif) || !exif) return 1;
    return tiff_orientation(exif, n);
}

/* ---- PNG bombs ---------------------------------------------------------- */

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* The filtered bytes the header's image needs: one filter byte per row
 * plus the row's bits, per Adam7 pass when interlaced; 0 when the header
 * is not one libpng would accept (it then says why). */
static uint64_t png_raw_bytes(const uint8_t *ihdr) {
    uint64_t w = be32(ihdr), h = be32(ihdr + 4);
    unsigned depth = ihdr[8], type = ihdr[9], interlace = ihdr[12];
    static const unsigned channels[7] = {1, 0, 3, 1, 2, 0, 4};
    if (type > 6 || !channels[type] || !depth || depth > 16) return 0;
    uint64_t bpp = (uint64_t)channels[type] * depth;
    if (!interlace) return h * (1 + (w * bpp + 7) / 8);
    static const unsigned x0[7] = {0, 4, 0, 2, 0, 1, 0}, dx[7] = {8, 8, 4, 4, 2, 2, 1};
    static const unsigned y0[7] = {0, 0, 4, 0, 2, 0, 1}, dy[7] = {8, 8, 8, 4, 4, 2, 2};
    uint64_t total = 0;
    for (int p = 0; p < 7; p++) {
        uint64_t pw = w > x0[p] ? (w - x0[p] + dx[p] - 1) / dx[p] : 0, ph = h > y0[p] ? (h - y0[p] + dy[p] - 1) / dy[p] : 0;
        if (pw && ph) total += ph * (1 + (pw * bpp + 7) / 8);
    }
    return total;
}

/* Refuses a PNG whose image data (IDAT) holds more than its header's image
 * can need, before libpng inflates any of it (libpng inflates the whole
 * stream, however long, to check its end): compressed, no more than the
 * raw bytes plus deflate's worst-case overhead; inflated, no more than the
 * raw bytes (one pass of zlib counting the output, stopped at the bound). */
static GfStatus png_check_idat(const uint8_t *b, size_t n, const ImageLimits *lim, GfError *err) {
    if (n < 33 || be32(b + 8) != 13 || memcmp(b + 12, "IHDR", 4) != 0) return GF_OK; /* libpng says why */
    if (check_dims(be32(b + 16), be32(b + 20), lim, err)) return err->status; /* before any inflating */
    uint64_t raw = png_raw_bytes(b + 16), packed = 0;
    if (!raw) return GF_OK;
    uint64_t most = raw + raw / 16000 * 5 + 1024; /* stored blocks: 5 bytes per 64 KiB, zlib's header and check */
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit(&z) != Z_OK) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    uint8_t sink[16384];
    uint64_t inflated = 0;
    GfStatus st = GF_OK;
    int done = 0;
    for (size_t at = 8; !st && !done && at + 12 <= n;) {
        uint32_t len = be32(b + at);
        if (len > n - at - 12) break; /* truncated: libpng says so */
        if (memcmp(b + at + 4, "IDAT", 4) == 0) {
            if ((packed += len) > most) {
                st = gf_error_set(err, GF_INVALID, "invalid_image", NULL,
                                  "invalid PNG: %llu bytes of compressed image data for a %u x %u image that needs at "
                                  "most %llu", (unsigned long long)packed, be32(b + 16), be32(b + 20),
                                  (unsigned long long)most);
                break;
            }
            z.next_in = (Bytef *)(b + at + 8);
            z.avail_in = len;
            while (!st && !done && z.avail_in) {
                z.next_out = sink;
                z.avail_out = sizeof sink;
                int rc = inflate(&z, Z_NO_FLUSH);
                inflated += sizeof sink - z.avail_out;
                if (inflated > raw)
                    st = gf_error_set(err, GF_INVALID, "invalid_image", NULL,
                                      "invalid PNG: its image data inflates past the %llu bytes a %u x %u image needs",
                                      (unsigned long long)raw, be32(b + 16), be32(b + 20));
                else if (rc == Z_STREAM_END) done = 1;
                else if (rc != Z_OK && rc != Z_BUF_ERROR) done = 1; /* corrupt: libpng says so */
                else if (rc == Z_BUF_ERROR && z.avail_out) break; /* wants the next chunk */
            }
        }
        at += 12 + (size_t)len;
    }
    inflateEnd(&z);
    return st;
}

/* Creates libpng's reader over src and reads the chunks before the image
 * data, checking the header's size against the caps. On GF_OK *png and
 * *info are the caller's (png_destroy_read_struct), who must set its own
 * png_jmpbuf before the next libpng call; on failure nothing is left. */
static GfStatus png_open(PngSrc *src, const ImageLimits *lim, png_structp *png_out, png_infop *info_out, GfError *err) {
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, src, png_on_error, png_on_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, NULL);
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "invalid PNG: %s", src->message);
    }
    png_set_read_fn(png, src, png_read_mem);
    png_set_user_limits(png, 1000000, 1000000);
    png_set_chunk_malloc_max(png, 8u << 20);
    png_set_chunk_cache_max(png, 1000);
    png_read_info(png, info);
    if (check_dims(png_get_image_width(png, info), png_get_image_height(png, info), lim, err)) {
        png_destroy_read_struct(&png, &info, NULL);
        return err->status;
    }
    *png_out = png;
    *info_out = info;
    return GF_OK;
}

/* Everything between setjmp and the end lives in this function; locals that
 * change after setjmp are volatile. */
static GfStatus decode_png(const uint8_t *bytes, size_t n, const ImageLimits *lim, Image *out,
                           GfError *err) {
    if (png_check_idat(bytes, n, lim, err)) return err->status;
    PngSrc src = {bytes, n, 0, ""};
    png_structp png;
    png_infop info;
    if (png_open(&src, lim, &png, &info, err)) return err->status;
    uint8_t *volatile rgb = NULL;
    png_bytep *volatile rows = NULL;
    if (setjmp(png_jmpbuf(png))) {
        free(rgb);
        free(rows);
        png_destroy_read_struct(&png, &info, NULL);
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "invalid PNG: %s", src.message);
    }
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int orientation = png_exif_orientation(png, info);
    png_set_expand(png);
    png_set_strip_16(png);
    png_set_strip_alpha(png);
    png_set_gray_to_rgb(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_rowbytes(png, info) != (size_t)w * 3) png_error(png, "unexpected row layout");
    rgb = gf_malloc((size_t)w * h * 3, NULL);
    rows = gf_malloc(sizeof(png_bytep) * h, NULL);
    if (!rgb || !rows) png_error(png, "out of memory");
    for (png_uint_32 y = 0; y < h; y++) rows[y] = rgb + (size_t)y * w * 3;
    png_read_image(png, rows);
    free(rows);
    png_destroy_read_struct(&png, &info, NULL);
    out->width = (int)w;
    out->height = (int)h;
    out->rgb = rgb;
    GfStatus ost = apply_orientation(out, orientation, err);
    if (ost) image_free(out);
    return ost;
}

/* ---- JPEG -------------------------------------------------------------- */

static uint8_t mul_div255(unsigned a, unsigned b) {
    unsigned t = a * b + 128;
    return (uint8_t)((t + (t >> 8)) >> 8);
}

/* The size and colour space of the frame header, checked against the caps. */
static GfStatus jpeg_header(tjhandle tj, const uint8_t *bytes, size_t n, const ImageLimits *lim, int *w, int *h, int *cs,
                            GfError *err) {
    int subsamp = 0;
    if (tjDecompressHeader3(tj, bytes, (unsigned long)n, w, h, &subsamp, cs) != 0)
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "invalid JPEG: %s", tjGetErrorStr2(tj));
    return check_dims((uint64_t)(*w > 0 ? *w : 0), (uint64_t)(*h > 0 ? *h : 0), lim, err);
}

static GfStatus decode_jpeg(const uint8_t *bytes, size_t n, const ImageLimits *lim, Image *out,
                            GfError *err) {
    tjhandle tj = tjInitDecompress();
    if (!tj) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "cannot start JPEG decoder");
    int w = 0, h = 0, cs = 0;
    if (jpeg_header(tj, bytes, n, lim, &w, &h, &cs, err)) { tjDestroy(tj); return err->status; }
    int cmyk = cs == TJCS_CMYK || cs == TJCS_YCCK;
    size_t px = (size_t)w * (size_t)h;
    uint8_t *buf = gf_malloc(px * (cmyk ? 4 : 3), NULL);
    if (!buf) { tjDestroy(tj); return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory"); }
    int flags = TJFLAG_LIMITSCANS | TJFLAG_STOPONWARNING;
    if (tjDecompress2(tj, bytes, (unsigned long)n, buf, w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB, flags) != 0) {
        gf_error_set(err, GF_INVALID, "invalid_image", NULL, "invalid JPEG: %s", tjGetErrorStr2(tj));
        free(buf);
        tjDestroy(tj);
        return GF_INVALID;
    }
    tjDestroy(tj);
    if (cmyk) { /* Adobe CMYK is stored inverted; PIL: r = (255-c)(255-k)/255 on the true values */
        for (size_t i = 0; i < px; i++) {
            const uint8_t *q = buf + 4 * i;
            uint8_t r = mul_div255(q[0], q[3]), g = mul_div255(q[1], q[3]), b = mul_div255(q[2], q[3]);
            buf[3 * i] = r; buf[3 * i + 1] = g; buf[3 * i + 2] = b;
        }
        uint8_t *shrunk = gf_realloc(buf, px * 3, NULL);
        if (shrunk) buf = shrunk;
    }
    out->width = w;
    out->height = h;
    out->rgb = buf;
    GfStatus ost = apply_orientation(out, jpeg_orientation(bytes, n), err);
    if (ost) image_free(out);
    return ost;
}

/* The width and height the header declares, after the orientation. */
static GfStatus probe_png(const uint8_t *bytes, size_t n, const ImageLimits *lim, int *w, int *h, GfError *err) {
    PngSrc src = {bytes, n, 0, ""};
    png_structp png;
    png_infop info;
    if (png_open(&src, lim, &png, &info, err)) return err->status;
    if (setjmp(png_jmpbuf(png))) { /* the getters below do not fail; should one, it lands here */
        png_destroy_read_struct(&png, &info, NULL);
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "invalid PNG: %s", src.message);
    }
    int o = png_exif_orientation(png, info);
    png_uint_32 pw = png_get_image_width(png, info), ph = png_get_image_height(png, info);
    png_destroy_read_struct(&png, &info, NULL);
    *w = (int)(o >= 5 ? ph : pw);
    *h = (int)(o >= 5 ? pw : ph);
    return GF_OK;
}

static GfStatus probe_jpeg(const uint8_t *bytes, size_t n, const ImageLimits *lim, int *w, int *h, GfError *err) {
    tjhandle tj = tjInitDecompress();
    if (!tj) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "cannot start JPEG decoder");
    int jw = 0, jh = 0, cs = 0;
    GfStatus st = jpeg_header(tj, bytes, n, lim, &jw, &jh, &cs, err);
    tjDestroy(tj);
    if (st) return st;
    int o = jpeg_orientation(bytes, n);
    *w = o >= 5 ? jh : jw;
    *h = o >= 5 ? jw : jh;
    return GF_OK;
}


/* A PNG's chunks (length, type, data, CRC) from the signature on, until
 * the first IDAT's length and type, where png_read_info stops. */
static int png_headers_within(const uint8_t *b, size_t n) {
    size_t pos = 8;
    while (pos <= n && n - pos >= 8) {
        uint32_t len = be32(b + pos);
        if (memcmp(b + pos + 4, "IDAT", 4) == 0) return 1;
        if ((uint64_t)len + 12 > n - pos) return 0;
        pos += 12 + (size_t)len;
    }
    return 0;
}

/* A JPEG's markers from SOI on, each segment by its length, until the
 * whole of the first SOS segment, where the header read stops (anything
 * else, bytes between markers included, says 0: the whole file decides). */
static int jpeg_headers_within(const uint8_t *b, size_t n) {
    size_t pos = 2;
    while (pos < n && n - pos >= 2 && b[pos] == 0xFF) {
        uint8_t m = b[pos + 1];
        if (m == 0xFF) { pos++; continue; }
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD8)) { pos += 2; continue; }
        if (m == 0xD9 || n - pos < 4) return 0;
        size_t len = (size_t)b[pos + 2] << 8 | b[pos + 3];
        if (len < 2 || len > n - pos - 2) return 0;
        if (m == 0xDA) return 1;
        pos += 2 + len;
    }
    return 0;
}

int image_headers_within(const uint8_t *bytes, size_t n) {
    switch (image_sniff(bytes, n)) {
    case IMAGE_FORMAT_PNG: return png_headers_within(bytes, n);
    case IMAGE_FORMAT_JPEG: return jpeg_headers_within(bytes, n);
    default: return 0;
    }
}

/* The checks every image gets before its format's header is read. */
static GfStatus check_bytes(const uint8_t *bytes, size_t n, const ImageLimits *lim, ImageFormat *fmt, GfError *err) {
    if (n == 0) return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "image is empty (0 bytes)");
    if (n > lim->max_bytes)
        return gf_error_set(err, GF_TOO_LARGE, "image_too_large", NULL,
                            "image is %zu bytes, over the cap of %llu", n, (unsigned long long)lim->max_bytes);
    *fmt = image_sniff(bytes, n);
    if (*fmt == IMAGE_FORMAT_UNKNOWN)
        return gf_error_set(err, GF_UNSUPPORTED, "unsupported_image_format", NULL, "image is neither PNG nor JPEG");
    return GF_OK;
}

GfStatus image_probe(const uint8_t *bytes, size_t n, const ImageLimits *lim, int *width, int *height, GfError *err) {
    *width = *height = 0;
    ImageFormat fmt;
    if (check_bytes(bytes, n, lim, &fmt, err)) return err->status;
    return fmt == IMAGE_FORMAT_PNG ? probe_png(bytes, n, lim, width, height, err)
                                   : probe_jpeg(bytes, n, lim, width, height, err);
}

GfStatus image_decode(const uint8_t *bytes, size_t n, const ImageLimits *lim, Image *out, GfError *err) {
    memset(out, 0, sizeof *out);
    ImageFormat fmt;
    if (check_bytes(bytes, n, lim, &fmt, err)) return err->status;
    return fmt == IMAGE_FORMAT_PNG ? decode_png(bytes, n, lim, out, err) : decode_jpeg(bytes, n, lim, out, err);
}
