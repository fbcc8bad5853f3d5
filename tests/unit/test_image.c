/* test_image.c - PNG/JPEG decoding: the fixture images decode to the sizes
 * the reference lists, gray and palette images convert to RGB as PIL does,
 * and caps are enforced from the header. */
#include <stdlib.h>

#include "check.h"
#include "image.h"

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
    image_free(&img);
    free(b);
}

int main(void) {
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
    return check_done("test_image");
}
