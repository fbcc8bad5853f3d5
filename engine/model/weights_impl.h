/* weights_impl.h - the internals of GemmaWeights: every bound tensor by
 * layer, for weights.c, which binds them, and the files that compute with
 * them (through model_impl.h). Read-only once weights_open returns. Not a
 * public header. */
#ifndef GF_WEIGHTS_IMPL_H
#define GF_WEIGHTS_IMPL_H

#include <pthread.h>
#include <stdatomic.h>

#include "kernels.h"
#include "tensor.h"
#include "weights.h"

typedef struct {
    float *input_ln, *post_attn_ln, *pre_ff_ln, *post_ff_ln; /* [H] */
    float *q_norm, *k_norm;                                  /* [D] */
    float layer_scalar;
    KnMatrix q, k, v, o, gate, up, down;
    KnMatrix ple_gate, ple_proj;                             /* [P, H], [H, P] */
    float *post_ple_ln;                                      /* [H] */
    KnMatrix router;                                         /* [E, H] */
    float *router_scale, *per_expert_scale;                  /* [H], [E] */
    float *router_in_scale;                                  /* [H] router_scale / sqrt(H) */
    KnMatrix experts_gate_up, experts_down;                  /* [E*2Im, H], [E*H, Im] */
    float *pre_ff_ln2, *post_ff_ln1, *post_ff_ln2;           /* [H] */
    float *inv_freq;                                         /* [D/2] */
} Layer;

/* A Gemma4ClippableLinear: clamps around the inner linear (when present). */
typedef struct {
    KnMatrix w;
    int clipped;
    float in_min, in_max, out_min, out_max;
} ClipLinear;

typedef struct {
    float *input_ln, *post_attn_ln, *pre_ff_ln, *post_ff_ln; /* [d] */
    float *q_norm, *k_norm;                                  /* [Dv] */
    ClipLinear q, k, v, o, gate, up, down;
} VisionLayer;

typedef struct {
    KnMatrix input_proj;            /* [d, 3 p^2] */
    KnMatrix pos_table;             /* [2 * P, d]: axis 0 (x) rows then axis 1 (y) */
    VisionLayer *layers;
    float *std_bias, *std_scale;    /* [d], standardize only */
    KnMatrix embed_proj;            /* [H, d] embed_vision.embedding_projection */
    float *inv_freq;                /* [Dv / 4] 2-D RoPE frequencies */
    float *pool_grad_scale;         /* [d] sqrt(d) / k^2 (times std_scale when standardizing) */
} VisionWeights;

/* Every tensor the ops read, as addresses on one device: the bound
 * checkpoint in host memory (GemmaWeights.host, what the CPU reads) or a
 * copy uploaded to another device (weights_on_device). */
typedef struct {
    KnMatrix embed;                 /* [V, H], tied lm_head */
    KnMatrix embed_ple, ple_model_proj; /* [V_ple, L*P], [L*P, H] */
    float *ple_norm, *final_norm;
    Layer *layers;
    VisionWeights vision;           /* bound when config.json has vision_config */
} WeightsTensors;

/* A copy of the tensors on one device, made on first use and kept until
 * the weights are freed. */
typedef struct WeightsDevice {
    KnBackend be;                   /* the context that made the copy and frees it; models on the device share its memory */
    KnBuffer buf;                   /* every tensor but those in map */
    KnBuffer map;                   /* host memory the device reads (alloc_mapped): the per-layer embedding table,
                                       when the weights keep it on the host; else empty */
    WeightsTensors t;               /* device addresses into buf (t.layers, t.vision.layers: host arrays owned here) */
    struct KnNf4 *nf4;              /* [n_nf4] as the host's, their arrays in buf */
    int counted;                    /* in the weights' gauge */
    struct WeightsDevice *next;
} WeightsDevice;

/* The tensors as a backend of kind on device index reads them: the host's
 * for the CPU; for another device, its copy, uploaded on the first call
 * (n_threads for the copy's own context). ple_host: the per-layer
 * embedding table (E2B/E4B: 2.4-2.9 B parameters, of which a step reads
 * one row per token) goes to host memory the device reads over the bus
 * when the backend has it (alloc_mapped), instead of device memory; the
 * first call on a device decides. *share (NULL for the CPU) is the copy's
 * context, for the caller to open its own as a sibling
 * (KnBackendOptions.share). Thread-safe. GF_NO_MEMORY naming the bytes,
 * GF_DEVICE, or the backend's open errors. */
GfStatus weights_on_device(GemmaWeights *gw, KnDeviceKind kind, int index, int n_threads, int ple_host,
                           const WeightsTensors **t, const KnBackend **share, GfError *err);
/* Deferred NF4: the host's arrays quantized from nf4_src on every core,
 * once (a no-op when they are, or when quantized at open). Called with
 * devices_lock held. GF_NO_MEMORY. */
GfStatus weights_nf4_host(GemmaWeights *gw, GfError *err);

/* 1 when p lies in the weights' arena (a widened, NF4 or derived array),
 * not in the mapped checkpoint. */
int weights_in_arena(const GemmaWeights *gw, const void *p);

/* Frees every device copy (weights_free, once no context runs on them). */
void weights_devices_free(GemmaWeights *gw);

/* A mapping of the weights' arena, read-only once the weights are open. */
typedef struct {
    void *base;
    size_t size;
} WeightsChunk;

struct GemmaWeights {
    atomic_int refs;
    ModelQuant quant;
    WeightsGauge *gauge;            /* counts these weights, or NULL */
    uint64_t resident_bytes;        /* weights_resident_bytes */
    uint64_t linear_bound_bytes;    /* the adaptable linears as bound, before NF4 */
    GemmaConfig cfg;
    ModelDir dir;
    WeightsTensors host;            /* the tensors in host memory */
    pthread_mutex_t devices_lock;   /* devices */
    WeightsDevice *devices;         /* copies on other devices */
    WeightsChunk *chunks;           /* the arena: every array the weights own (widened, NF4, derived) */
    size_t n_chunks, cap_chunks;
    uint8_t *cur;                   /* the open chunk's free space */
    size_t cur_left;
    struct KnNf4 *nf4;              /* QLoRA: the quantized linears the KnMatrix views point at (payloads in the arena,
                                       or, when deferred, malloc'ed once nf4_host_ready; until then sizes alone) */
    size_t n_nf4;
    KnMatrix *nf4_src;              /* [n_nf4] deferred NF4: the stored linears, each quantized where it is used (a
                                       device copy's backend at upload, the host's cores for the first CPU context);
                                       NULL when quantized at open */
    atomic_int nf4_host_ready;      /* deferred NF4: the host's arrays are filled (set under devices_lock) */
    uint8_t **claimed;              /* per shard, per tensor */
    char prefix[32];                /* "model.language_model." or "model." */
};

#endif
