/* vision_cache.h - the vision tower's output kept per (image, adapter's
 * vision weights), so a request that repeats an image (a chat resending it
 * every turn, many clients asking about one picture) skips the tower.
 *
 * Keyed by the SHA-256 of the image's bytes (the engine's preprocessing is
 * fixed, so the bytes decide the pixels) and the digest of what in the
 * adapter can change the tower's output (vision_cache_adapter_digest: its
 * vision-tower and embed_vision pairs and its scale), never by the
 * adapter's name: a replaced adapter never sees the old one's features. The
 * base and adapters of the text model alone share one digest (all zero), as
 * they share the features. Entries live in device memory of the model's
 * backend; the least recently used go past the byte budget.
 *
 * Ownership: the cache owns its entries' buffers. Threading: the engine
 * thread only (it owns the backend).
 */
#ifndef GF_VISION_CACHE_H
#define GF_VISION_CACHE_H

#include <stdint.h>

#include "lora.h"
#include "model.h"

#define VISION_DIGEST_LEN 32

typedef struct VisionCache VisionCache;

typedef struct {
    uint64_t hits, misses;   /* lookups */
    uint64_t bytes;          /* held */
    int entries;
} VisionCacheStats;

/* A cache of at most max_bytes of features (0: keeps nothing, counts
 * misses). NULL with err when out of memory. */
VisionCache *vision_cache_new(Model *m, uint64_t max_bytes, GfError *err);
void vision_cache_free(VisionCache *c);

/* The digest of a's vision part; all zero when a is NULL or adapts nothing
 * the vision tower runs. */
void vision_cache_adapter_digest(const LoraAdapter *a, uint8_t out[VISION_DIGEST_LEN]);

/* 1 with dst [n_soft, text hidden] (device memory) filled when the cache
 * holds the features of (image, vision) with n_soft soft tokens; else 0. */
int vision_cache_get(VisionCache *c, const uint8_t image[VISION_DIGEST_LEN], const uint8_t vision[VISION_DIGEST_LEN],
                     int64_t n_soft, float *dst);

/* Keeps a copy of src [n_soft, text hidden] (device memory) under (image,
 * vision), evicting the least recently used entries to fit; does nothing
 * when it cannot (larger than the budget, out of device memory). */
void vision_cache_put(VisionCache *c, const uint8_t image[VISION_DIGEST_LEN], const uint8_t vision[VISION_DIGEST_LEN],
                      int64_t n_soft, const float *src);

void vision_cache_stats(const VisionCache *c, VisionCacheStats *out);

#endif
