/* model_impl.h - the internals of a Model (one thread's context), shared by
 * the files that run it: model.c opens it, forward.c, moe.c and vision.c
 * compute with it, lora.c and backward.c adapt it. Not a public header. */
#ifndef GF_MODEL_IMPL_H
#define GF_MODEL_IMPL_H

#include "model.h"
#include "weights_impl.h"

/* The small host tables of one batched forward, grown to the largest batch
 * seen: row offsets, adapter segments and attention descriptions per
 * sequence, embedding ids, positions and KV store slots per row (uploaded
 * each step). */
typedef struct {
    int64_t *row0;                  /* [seq_cap] */
    KnLoraSeg *segs;                /* [seq_cap] */
    KnAttnSeq *att;                 /* [seq_cap] */
    int32_t *ids, *pos;             /* [row_cap] */
    int32_t *slots;                 /* [KV_SPACES * row_cap]: each row's slot in its store, space by space */
    size_t seq_cap, row_cap;
    uint64_t *sig;                  /* [sig_cap] a decode step's signature (forward.c step_signature) */
    size_t sig_cap;
    /* a bucketed decode step's row tables (forward.c row_tables): built on
     * the host, and the device buffer they are uploaded to */
    uint8_t *rows_host;
    size_t rows_cap;
    KnBuffer d_rows;
    uint64_t *lora_active;          /* [active_words] bit li * LORA_TEXT_SLOTS + slot: some row has an adapter there */
    size_t active_words;
    uint64_t *rows_key;             /* [rows_key_words] what the tables in d_rows were built from (0 words: none) */
    size_t rows_key_words, rows_key_cap;
} StepTables;



/* One thread's context over shared weights. */
struct Model {
    GemmaWeights *w;                /* one reference held */
    const WeightsTensors *wt;       /* the tensors as this model's device reads them (w's host view, or its copy) */
    KnBackend be;                   /* op table + context of the device the model runs on */
    KnBuffer act;                   /* forward activations (device), grown to the largest batch seen */
    StepTables tables;              /* a batch's host index tables */
    KnBuffer vision_mem;            /* the vision tower's buffers (device), grown to the largest image seen */
    int32_t *vision_idx;            /* their host index staging */
    size_t vision_idx_cap;
    int64_t moe_chunk;              /* tokens per MoE call (moe_chunk_tokens; 0 without MoE) */
    int64_t loss_chunk;             /* ModelOptions.loss_chunk as asked (<= 0: backward.c's default) */
    int checkpoints_bf16;           /* the training forward keeps layer inputs in bf16 (ModelOptions.checkpoints) */
    void (*yield)(void *cls);       /* called between layers and loss chunks (model_set_yield), NULL = none */
    void *yield_cls;
    ModelGraphStats graphs;         /* decode steps through graphs (forward.c) */
    int graphs_off;                 /* the backend records no more (ops.h KN_GRAPH_OFF): decode steps are no longer bucketed */
};

/* A layer (or a loss chunk) is done: the device's queue drained and the
 * yield hook run. */
void model_layer_done(Model *m);

/* Helpers of forward.c used by backward.c. */
/* The buffers one text decoder layer writes, each [n, width] of device
 * memory (width: H, NH*D for queries and attention, KVH*D for keys and
 * values, I for the MLP, P for PLE). The forward of serving and the CLI
 * points most of them at the same scratch and updates the residual stream
 * in place; the training backward's tape keeps each one apart. */
typedef struct {
    float *h1;                 /* input_layernorm(x) */
    float *qlin, *qr;          /* q_proj(h1); q_norm'd and rotated */
    float *klin, *vlin;        /* k_proj(h1), v_proj(h1) (normed, rotated and stored in place when not replaying) */
    float *kn, *vn;            /* replaying: klin, vlin normed and rotated, to be stored again (klin and vlin
                                  stay the projections, which the backward reads) */
    float *att, *o;            /* attention output; o_proj(att) */
    float *x1, *h2;            /* x + attention; pre_feedforward_layernorm(x1) */
    float *g, *u, *mm, *d;     /* gate_proj(h2), up_proj(h2), gelu(g) * u, down_proj(mm) */
    float *f, *moe;            /* the feed-forward output (with the MoE block's), the MoE block's */
    float *x2;                 /* x1 + FFN */
    float *pg, *pm, *pp;       /* per_layer_input_gate(x2), gelu(pg) * ple, per_layer_projection(pm) */
    float *out;                /* the layer's output (times layer_scalar) */
} LayerBufs;

/* model_forward with the hidden states kept in device memory (the
 * training forward's layer checkpoints), no logits; its attention (and
 * model_layer_replay's) through attention_bulk (ops.h): no decode step has
 * to equal a training forward bit for bit. With kept NULL, hidden gets
 * [(L + 1), n, H]: every layer's input, then the final normed output. With
 * kept, the inputs of layers 1 .. L - 1 go there in bf16 ([L - 1, n, H],
 * round_bf16: the forward goes on from the rounded values) and hidden gets
 * [2, n, H]: the input of layer 0, then the final normed output. Each
 * layer runs in tape's buffers (its out excepted: the residual stream stays
 * in the Model's scratch), so that the scratch holds no layer buffers of
 * its own (model_scratch_bytes with layer_bufs 0). */
GfStatus model_forward_hidden(Model *m, KvCache *c, const ModelInput *in, float *hidden, uint16_t *kept,
                              const LayerBufs *tape, GfError *err);
/* Device bytes of the Model's scratch for a batch of n rows of adapters of
 * rank <= max_rank (a forward grows it to the largest it runs); layer_bufs
 * 0: model_forward_hidden's and model_layer_replay's, without the layer,
 * logits and sampling buffers. */
uint64_t model_scratch_bytes(const Model *m, int64_t n, int max_rank, int layer_bufs);

/* Replays layer li for the last in->n positions of c (which a forward of
 * in, e.g. model_forward_hidden, filled): from the layer's input x[n, H]
 * and the per-layer inputs ple[n, L, P] (NULL without PLE), every
 * intermediate into tape (distinct buffers, but for those the layer may
 * share: d with f without MoE, x2 with out without PLE, t with any buffer
 * it does not read), with exactly the ops and values of the forward. A
 * layer that stores K/V stores them into c again (normed and rotated into
 * tape's kn, vn; klin and vlin stay the projections): a training cache's
 * layers share a store (kv_cache_init_training). The training backward's
 * checkpointing. */
GfStatus model_layer_replay(Model *m, KvCache *c, const ModelInput *in, int li, const float *x, const float *ple,
                            const LayerBufs *tape, GfError *err);
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
/* Tokens per MoE call: asked when positive, else as many as MOE_TAPE_BYTES
 * of tape holds, within [16, 512] (more tokens per call, fewer launches and
 * more tokens per expert for the device's expert matmuls); 0 without MoE. */
int64_t moe_chunk_tokens(const TextConfig *t, int64_t asked);
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
