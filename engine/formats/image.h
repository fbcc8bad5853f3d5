/* image.h - PNG and JPEG decoding to 8-bit RGB, with caps checked first.
 *
 * The format is chosen by magic number, never by a declared type. Caps on the
 * encoded size and on width x height (computed in 64 bits) are checked from
 * the header before any pixel buffer exists, so a decompression bomb costs
 * nothing. Conversion to RGB follows PIL's Image.convert("RGB"): gray is
 * replicated, alpha is dropped (not composited), palettes are expanded,
 * 16-bit samples keep their high byte. JPEG decoding stops on the first
 * warning and limits progressive scans (corrupt data is an error, never a
 * half-grey picture). CMYK JPEGs (Adobe, inverted) are converted as PIL does.
 * An EXIF Orientation tag (JPEG APP1, PNG eXIf before the image data) is
 * applied as PIL's ImageOps.exif_transpose does, which transformers'
 * load_image calls: width and height are those of the upright picture.
 *
 * Errors (codes): unsupported_image_format (GF_UNSUPPORTED), invalid_image
 * (GF_INVALID: truncated, bad CRC, zero size, corrupt data), image_too_large
 * (GF_TOO_LARGE for bytes, GF_INVALID for pixels). Thread-safe.
 */
#ifndef GF_IMAGE_H
#define GF_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"

typedef enum { IMAGE_FORMAT_UNKNOWN = 0, IMAGE_FORMAT_PNG, IMAGE_FORMAT_JPEG } ImageFormat;

typedef struct {
    uint64_t max_bytes;   /* encoded size cap */
    uint64_t max_pixels;  /* width * height cap */
} ImageLimits;

typedef struct {
    int width, height;    /* pixels */
    uint8_t *rgb;         /* [height][width][3], owned; free with image_free */
} Image;

/* Format from the first bytes; IMAGE_FORMAT_UNKNOWN when neither. */
ImageFormat image_sniff(const uint8_t *bytes, size_t n);

/* 1 when bytes[0..n) hold every header image_probe reads of the whole
 * file they begin (a PNG's chunks up to its first IDAT, a JPEG's segments
 * through its first SOS), so that image_probe of them gives what it gives
 * of the whole file; 0 when they may not (then probe the whole file). */
int image_headers_within(const uint8_t *bytes, size_t n);

/* Decodes bytes[0..n) into *out. On failure *out is empty and err says why. */
GfStatus image_decode(const uint8_t *bytes, size_t n, const ImageLimits *limits, Image *out,
                      GfError *err);

/* The width and height image_decode would give bytes[0..n) (the EXIF
 * orientation applied), read from the headers alone under the same caps
 * and with the same errors for what the headers show; the image data is
 * not read, so a picture corrupt past its headers probes without error.
 * For data image_decode has already accepted. On failure both are 0. */
GfStatus image_probe(const uint8_t *bytes, size_t n, const ImageLimits *limits, int *width, int *height,
                     GfError *err);

void image_free(Image *img);

#endif
