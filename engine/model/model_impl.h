/* model_impl.h - the Model's internals, shared by the files of the model
 * (model.c binds weights, forward.c runs them). Not a public header. */
#ifndef GF_MODEL_IMPL_H
#define GF_MODEL_IMPL_H

#include "model.h"

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

/* The small host tables of one batched forward, grown to the largest batch
 * seen: row offsets and adapter segments per sequence, embedding ids and
 * positions per row (uploaded each step). */
typedef struct {
    int64_t *row0;                  /* [seq_cap] */
    KnLoraSeg *segs;                /* [seq_cap] */
    int32_t *ids, *pos;             /* [row_cap] */
    size_t seq_cap, row_cap;
} StepTables;

struct Model {
    GemmaConfig cfg;
    ModelDir dir;
    KnBackend be;                   /* op table + context of the device the model runs on */
    KnMatrix embed;                 /* [V, H], tied lm_head */
    KnMatrix embed_ple, ple_model_proj; /* [V_ple, L*P], [L*P, H] */
    float *ple_norm, *final_norm;
    Layer *layers;
    VisionWeights vision;           /* bound when config.json has vision_config */
    void **owned;                   /* widened copies */
    struct KnNf4 *nf4;              /* QLoRA: the quantized linears the KnMatrix views point at */
    size_t n_nf4;
    size_t n_owned;
    uint8_t **claimed;              /* per shard, per tensor */
    char prefix[32];                /* "model.language_model." or "model." */
    KnBuffer act;                   /* forward activations (device), grown to the largest batch seen */
    StepTables tables;              /* a batch's host index tables */
};

/* Helpers of model.c used by vision.c. */
GfStatus model_bind_matrix(Model *m, const char *name, int64_t rows, int64_t cols, KnMatrix *out, GfError *err);
GfStatus model_bind_vector(Model *m, const char *name, int64_t n, float **out, GfError *err);
/* A 3-D tensor [e, rows, cols] as a matrix of e*rows rows. */
GfStatus model_bind_3d(Model *m, const char *name, int64_t e, int64_t rows, int64_t cols, KnMatrix *out, GfError *err);
/* A 0-dimensional tensor (a scalar buffer). */
GfStatus model_bind_scalar(Model *m, const char *name, float *out, GfError *err);
/* Takes ownership of p (freed at model_close); -1 with err set (p not taken) when out of memory. */
int model_keep(Model *m, void *p, GfError *err);
GfStatus vision_bind(Model *m, GfError *err);

/* Helpers of forward.c used by backward.c. */
/* model_forward with the hidden states [(L + 1), n, H] kept in device
 * memory (the training forward's layer checkpoints), no logits. */
GfStatus model_forward_hidden(Model *m, KvCache *c, const ModelInput *in, float *hidden, GfError *err);
/* 1 image, 2 video, 3 audio placeholder, 0 text. */
int model_mm_kind(const GemmaConfig *c, int32_t id);
/* The embedding row of each token of in (placeholders look up the pad
 * row) into the host array ids[in->n]. */
void model_embed_ids(const Model *m, const ModelInput *in, int32_t *ids);
/* Per-layer inputs ple[n, L, P] (§3.3) of in (its lora included) from its
 * embedding rows ids[n] and the embedded sequence x0[n, H], all device
 * memory; tok holds n * L * P floats, lora_tmp n * rank floats. */
void model_ple_inputs(Model *m, const ModelInput *in, const int32_t *ids, const float *x0, float *ple, float *tok,
                      float *lora_tmp);

/* The MoE block of a run of tokens (moe.c). A tape holds what the backward
 * needs for up to cap tokens and the scratch of both directions, cut from
 * one device buffer of moe_tape_floats(t, cap) floats (0 without MoE). */
typedef struct {
    int64_t cap;
    float *u0, *rin, *u2, *y, *dy, *du;    /* [cap, H] */
    float *p, *dp;                         /* [cap, E] router probabilities, their gradient */
    float *w, *coef, *dc;                  /* [cap, K] chosen probabilities, coefficients, their gradient */
    int32_t *idx;                          /* [cap, K] chosen experts */
    float *gu, *mm, *yk;                   /* [cap, K, 2Im], [cap, K, Im], [cap, K, H] */
    float *scratch;                        /* [4 Im] */
} MoeTape;
size_t moe_tape_floats(const TextConfig *t, int64_t cap);
void moe_tape_init(MoeTape *mt, const TextConfig *t, float *buf, int64_t cap);
/* out[n, H] = the block on the residual rows r[n, H] (out may not alias r), n <= cap. */
void moe_forward(Model *m, const Layer *l, const float *r, float *out, int64_t n, MoeTape *mt);
/* dr[n, H] += its gradient for dout[n, H]; call right after moe_forward at r. */
void moe_backward(Model *m, const Layer *l, const float *r, const float *dout, float *dr, int64_t n, MoeTape *mt);

/* Helper of vision.c used by backward.c: the gradients of the tower's
 * adapters (lora's vision pairs, input_proj, embed_proj: their dA, dB
 * accumulate) for d(soft tokens) dsoft[n_soft, text hidden] of one image
 * (arguments as model_vision_forward). Re-runs the tower, one layer at a time
 * in reverse. */
GfStatus model_vision_backward(Model *m, const LoraBinding *lora, const float *pixels, const int32_t *positions,
                               int64_t n_patches, const float *dsoft, int64_t n_soft, GfError *err);

#endif
