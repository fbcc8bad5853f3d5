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
    KnMatrix experts_gate_up, experts_down;                  /* [E*2Im, H], [E*H, Im] */
    float *pre_ff_ln2, *post_ff_ln1, *post_ff_ln2;           /* [H] */
    float *inv_freq;                                         /* [D/2] */
} Layer;

struct Model {
    GemmaConfig cfg;
    ModelDir dir;
    KnCtx ctx;
    const KnOps *ops;
    KnMatrix embed;                 /* [V, H], tied lm_head */
    KnMatrix embed_ple, ple_model_proj; /* [V_ple, L*P], [L*P, H] */
    float *ple_norm, *final_norm;
    Layer *layers;
    void **owned;                   /* widened copies */
    size_t n_owned;
    uint8_t **claimed;              /* per shard, per tensor */
    char prefix[32];                /* "model.language_model." or "model." */
};

#endif
