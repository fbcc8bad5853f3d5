/* vision_cache.c - the LRU of vision tower outputs of vision_cache.h: a
 * small array searched linearly (entries are megabytes each; a budget holds
 * tens to hundreds of them). */
#include "vision_cache.h"

#include <stdlib.h>
#include <string.h>

#include "sha256.h"

typedef struct {
    uint8_t key[2 * VISION_DIGEST_LEN]; /* image digest, then the adapter's vision digest */
    int64_t n_soft;
    KnBuffer feats;           /* [n_soft, H] on the model's device */
    uint64_t bytes;
    uint64_t last_used;
} Entry;

struct VisionCache {
    Model *m;
    int64_t hidden;
    uint64_t max_bytes, bytes, clock;
    Entry *entries;
    int n, cap;
    uint64_t hits, misses;
};

VisionCache *vision_cache_new(Model *m, uint64_t max_bytes, GfError *err) {
    VisionCache *c = gf_calloc(1, sizeof *c, err);
    if (!c) return NULL;
    c->m = m;
    c->hidden = model_config(m)->text.hidden_size;
    c->max_bytes = max_bytes;
    return c;
}

void vision_cache_free(VisionCache *c) {
    if (!c) return;
    for (int i = 0; i < c->n; i++) model_device_free(c->m, &c->entries[i].feats);
    free(c->entries);
    free(c);
}

static int is_vision_module(const char *module) {
    return strncmp(module, "model.vision_tower.", 19) == 0 || strncmp(module, "model.embed_vision.", 19) == 0;
}

void vision_cache_adapter_digest(const LoraAdapter *a, uint8_t out[VISION_DIGEST_LEN]) {
    memset(out, 0, VISION_DIGEST_LEN);
    int any = 0;
    GfSha256 h;
    gf_sha256_init(&h);
    for (size_t i = 0; a && i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        if (!is_vision_module(p->module)) continue;
        int64_t dims[3] = {p->in, p->out, p->rank};
        gf_sha256_update(&h, p->module, strlen(p->module) + 1);
        gf_sha256_update(&h, dims, sizeof dims);
        gf_sha256_update(&h, p->A, (size_t)(p->rank * p->in) * sizeof(float));
        gf_sha256_update(&h, p->B, (size_t)(p->out * p->rank) * sizeof(float));
        any = 1;
    }
    if (!any) return;
    gf_sha256_update(&h, &a->scale, sizeof a->scale);
    gf_sha256_final(&h, out);
}

static Entry *find(VisionCache *c, const uint8_t *key) {
    for (int i = 0; i < c->n; i++)
        if (memcmp(c->entries[i].key, key, sizeof c->entries[i].key) == 0) return &c->entries[i];
    return NULL;
}

static void make_key(uint8_t key[2 * VISION_DIGEST_LEN], const uint8_t *image, const uint8_t *vision) {
    memcpy(key, image, VISION_DIGEST_LEN);
    memcpy(key + VISION_DIGEST_LEN, vision, VISION_DIGEST_LEN);
}

int vision_cache_get(VisionCache *c, const uint8_t image[VISION_DIGEST_LEN], const uint8_t vision[VISION_DIGEST_LEN],
                     int64_t n_soft, float *dst) {
    uint8_t key[2 * VISION_DIGEST_LEN];
    make_key(key, image, vision);
    Entry *e = find(c, key);
    if (!e || e->n_soft != n_soft) {
        c->misses++;
        return 0;
    }
    model_device_copy(c->m, dst, e->feats.data, (size_t)e->bytes);
    e->last_used = ++c->clock;
    c->hits++;
    return 1;
}

static void evict_one(VisionCache *c) {
    int lru = 0;
    for (int i = 1; i < c->n; i++)
        if (c->entries[i].last_used < c->entries[lru].last_used) lru = i;
    c->bytes -= c->entries[lru].bytes;
    model_device_free(c->m, &c->entries[lru].feats);
    c->entries[lru] = c->entries[--c->n];
}

void vision_cache_put(VisionCache *c, const uint8_t image[VISION_DIGEST_LEN], const uint8_t vision[VISION_DIGEST_LEN],
                      int64_t n_soft, const float *src) {
    uint64_t bytes = (uint64_t)(n_soft * c->hidden) * sizeof(float);
    uint8_t key[2 * VISION_DIGEST_LEN];
    make_key(key, image, vision);
    if (bytes == 0 || bytes > c->max_bytes || find(c, key)) return;
    while (c->n && c->bytes + bytes > c->max_bytes) evict_one(c);
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 16;
        Entry *grown = realloc(c->entries, (size_t)cap * sizeof *grown);
        if (!grown) return;
        c->entries = grown;
        c->cap = cap;
    }
    Entry *e = &c->entries[c->n];
    memset(e, 0, sizeof *e);
    GfError err;
    if (model_device_alloc(c->m, &e->feats, (size_t)bytes, "cached vision features", &err)) return;
    model_device_copy(c->m, e->feats.data, src, (size_t)bytes);
    memcpy(e->key, key, sizeof e->key);
    e->n_soft = n_soft;
    e->bytes = bytes;
    e->last_used = ++c->clock;
    c->bytes += bytes;
    c->n++;
}

void vision_cache_stats(const VisionCache *c, VisionCacheStats *out) {
    *out = (VisionCacheStats){c->hits, c->misses, c->bytes, c->n};
}
