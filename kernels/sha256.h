/* sha256.h - SHA-256 (FIPS 180-4), streaming and one-shot.
 *
 * Used for artifact integrity (adapters, checkpoints: the digest stored at
 * publish time catches a flipped byte later) and for API keys, which are kept
 * and compared only as digests. Pure computation: no allocation, no global
 * state, thread-safe on distinct contexts.
 */
#ifndef GF_SHA256_H
#define GF_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define GF_SHA256_LEN 32

typedef struct {
    uint32_t h[8];
    uint64_t n_bytes;       /* total bytes absorbed */
    uint8_t block[64];
    size_t n_block;         /* bytes pending in block */
} GfSha256;

void gf_sha256_init(GfSha256 *ctx);
void gf_sha256_update(GfSha256 *ctx, const void *data, size_t n);
/* Writes the 32-byte digest; ctx must be re-initialized before reuse. */
void gf_sha256_final(GfSha256 *ctx, uint8_t out[GF_SHA256_LEN]);
void gf_sha256(const void *data, size_t n, uint8_t out[GF_SHA256_LEN]);

/* Compares two n-byte buffers in time independent of their content.
 * Returns 1 when equal. */
int gf_ct_equal(const void *a, const void *b, size_t n);

#endif /* GF_SHA256_H */
