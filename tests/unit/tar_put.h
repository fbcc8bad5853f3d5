/* tar_put.h - writing test archives with the product's own header writer
 * (tar.h): tar_put adds one member (its header, its n bytes, zeros to the
 * next 512), tar_end the two zero blocks that close the archive. */
#ifndef GF_TEST_TAR_PUT_H
#define GF_TEST_TAR_PUT_H

#include <stdint.h>
#include <stdio.h>

#include "tar.h"

static inline void tar_put(FILE *f, const char *name, const void *data, size_t n) {
    static const uint8_t zeros[512];
    uint8_t h[512];
    tar_header_write(h, name, n, 0);
    fwrite(h, 1, sizeof h, f);
    if (n) fwrite(data, 1, n, f);
    fwrite(zeros, 1, (512 - n % 512) % 512, f);
}

static inline void tar_end(FILE *f) {
    static const uint8_t zeros[1024];
    fwrite(zeros, 1, sizeof zeros, f);
}

#endif
