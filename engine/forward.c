/* forward.c - the Gemma 4 text forward pass (GEMMA4.md §3-§4) over a KV
 * cache, and greedy generation. One sequence per call; prefill of n tokens
 * and n single-token steps compute the same function. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "model_impl.h"
#include "lora.h"

/* ---- KV cache ------------------------------------------------------------- */

GfStatus kv_cache_init(KvCache *c, const Model *m, int64_t capacity, GfError *err) {
    memset(c, 0, sizeof *c);
    const TextConfig *t = &m->cfg.text;
    c->capacity = capacity;
    c->k = gf_calloc((size_t)t->n_layers, sizeof *c->k, err);
    c->v = gf_calloc((size_t)t->n_layers, sizeof *c->v, err);
    c->valid = gf_calloc((size_t)capacity, 1, err);
    c->group = gf_calloc((size_t)capacity, sizeof *c->group, err);
    if (!c->k || !c->v || !c->valid || !c->group) { kv_cache_free(c); return GF_NO_MEMORY; }
    for (int i = 0; i < t->n_layers; i++) {
        const LayerConfig *l = &t->layers[i];
        if (l->kv_shared) continue;
        size_t n = (size_t)capacity * (size_t)l->kv_heads * (size_t)l->head_dim;
        c->k[i] = gf_malloc(n * sizeof(float), err);
        c->v[i] = gf_malloc(n * sizeof(float), err);
        if (!c->k[i] || !c->v[i]) { kv_cache_free(c); return GF_NO_MEMORY; }
    }
    c->n_layers = t->n_layers;
    return GF_OK;
}

void kv_cache_free(KvCache *c) {
    if (!c) return;
    for (int i = 0; c->k && i < c->n_layers; i++) free(c->k[i]);
    for (int i = 0; c->v && i < c->n_layers; i++) free(c->v[i]);
    free(c->k);
    free(c->v);
    free(c->valid);
    free(c->group);
    free(c->scratch);
    memset(c, 0, sizeof *c);
}

void kv_cache_reset(KvCache *c) {
    c->n_past = 0;
    c->n_groups = 0;
}

/* ---- scratch -------------------------------------------------------------- */

typedef struct {
    float *x, *h, *a;          /* [n, H] */
    float *q, *att;            /* [n, NH * Dmax] */
    float *k, *v;              /* [n, KVHmax * Dmax] */
    float *gate, *up;          /* [n, Imax] */
    float *ple, *ple_g;        /* [n, L, P], [n, P] */
    MoeTape moe;
    const LoraBinding *lora;   /* the sequence's adapter, or NULL */
    float *lora_tmp;           /* [n, max rank] */
} Scratch;

static GfStatus scratch_take(KvCache *c, const Model *m, int64_t n, const LoraBinding *lora, Scratch *s, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, dmax = 0, kvmax = 0, imax = 0, LP = (int64_t)t->n_layers * t->ple_dim;
    for (int i = 0; i < t->n_layers; i++) {
        const LayerConfig *l = &t->layers[i];
        if (l->head_dim > dmax) dmax = l->head_dim;
        if ((int64_t)l->kv_heads * l->head_dim > kvmax) kvmax = (int64_t)l->kv_heads * l->head_dim;
        if (l->intermediate > imax) imax = l->intermediate;
    }
    int64_t qw = t->n_heads * dmax;
    float *moe_buf;
    size_t sizes[] = {n * H, n * H, n * H, n * qw, n * qw, n * kvmax, n * kvmax, n * imax, n * imax,
                      n * LP, n * t->ple_dim, moe_tape_floats(t),
                      lora ? n * lora->max_rank : 0};
    float **slots[] = {&s->x, &s->h, &s->a, &s->q, &s->att, &s->k, &s->v, &s->gate, &s->up,
                       &s->ple, &s->ple_g, &moe_buf, &s->lora_tmp};
    s->lora = lora;
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) total += (sizes[i] + 15) & ~(size_t)15;
    if (total > c->scratch_floats) {
        float *b = realloc(c->scratch, total * sizeof(float));
        if (!b) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for activations");
        c->scratch = b;
        c->scratch_floats = total;
    }
    float *p = c->scratch;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = p;
        p += (sizes[i] + 15) & ~(size_t)15;
    }
    moe_tape_init(&s->moe, t, moe_buf);
    return GF_OK;
}

/* ---- pieces of the forward pass --------------------------------------------- */

/* y[n, out] = x W^T, plus the adapter's term when the slot is adapted. */
static void linear(Model *m, const Scratch *s, float *y, const float *x, KnMatrix w, int li, int slot, int64_t n) {
    m->ops->matmul(&m->ctx, y, x, w, n);
    const LoraPair *p = s->lora ? s->lora->text[li * LORA_TEXT_SLOTS + slot] : NULL;
    if (p) lora_apply(s->lora, p, y, x, n, s->lora_tmp);
}

int model_mm_kind(const GemmaConfig *c, int32_t id) {
    if (id == c->image_token_id) return 1;
    if (id == c->video_token_id) return 2;
    if (id == c->audio_token_id) return 3;
    return 0;
}

/* Token rows, placeholders looked up as pad and then overwritten by soft
 * tokens (§3.2, §5); fills the cache's validity and vision groups (§4). */
static GfStatus embed(Model *m, KvCache *c, const ModelInput *in, float *x, GfError *err) {
    const GemmaConfig *g = &m->cfg;
    const TextConfig *t = &g->text;
    float scale = sqrtf((float)t->hidden_size);
    int64_t soft = 0;
    for (int64_t i = 0; i < in->n; i++) {
        int32_t id = in->ids[i];
        if (id < 0 || id >= t->vocab_size)
            return gf_error_set(err, GF_INVALID, "invalid_token", NULL, "token id %d at position %lld is outside the vocabulary",
                                id, (long long)i);
        int kind = in->mm_type ? in->mm_type[i] : model_mm_kind(g, id);
        int64_t pos = c->n_past + i;
        m->ops->embed_row(x + i * t->hidden_size, m->embed, kind ? t->pad_id : id, scale);
        if (in->soft_tokens && id == g->image_token_id)
            memcpy(x + i * t->hidden_size, in->soft_tokens + (soft++) * t->hidden_size, (size_t)t->hidden_size * sizeof(float));
        c->valid[pos] = in->valid ? in->valid[i] : 1;
        int vision = kind == 1 || kind == 2;
        c->group[pos] = !vision ? -1 : (pos > 0 && c->group[pos - 1] >= 0) ? c->group[pos - 1] : c->n_groups++;
    }
    return GF_OK;
}

/* Per-layer embeddings (§3.3): ple[n, L, P] from the token ids and the
 * embedded sequence x0[n, H]; lora_tmp holds n * rank floats. */
void model_ple_inputs(Model *m, const ModelInput *in, const float *x, float *ple, float *lora_tmp) {
    const TextConfig *t = &m->cfg.text;
    int64_t L = t->n_layers, P = t->ple_dim, H = t->hidden_size, n = in->n;
    m->ops->matmul(&m->ctx, ple, x, m->ple_model_proj, n);
    if (in->lora && in->lora->ple_model_proj) lora_apply(in->lora, in->lora->ple_model_proj, ple, x, n, lora_tmp);
    float ctx_scale = (float)(1.0 / sqrt((double)H)), tok_scale = sqrtf((float)P), mix = (float)(1.0 / sqrt(2.0));
    for (int64_t i = 0; i < n * L * P; i++) ple[i] *= ctx_scale;
    m->ops->rmsnorm(&m->ctx, ple, ple, m->ple_norm, n * L, P, t->rms_eps);
    float *tok = malloc((size_t)(L * P) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        int32_t id = in->ids[i];
        int kind = in->mm_type ? in->mm_type[i] : model_mm_kind(&m->cfg, id);
        if (tok) m->ops->embed_row(tok, m->embed_ple, kind ? t->pad_id : id, tok_scale);
        for (int64_t j = 0; tok && j < L * P; j++) ple[i * L * P + j] = (ple[i * L * P + j] + tok[j]) * mix;
    }
    free(tok);
}

/* Self-attention of layer li for n new tokens (§3.5, §3.6); result in s->h [n, H]. */
static void attention(Model *m, KvCache *c, int li, int64_t n, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    const Layer *l = &m->layers[li];
    int D = lc->head_dim, NH = t->n_heads, KVH = lc->kv_heads;
    int64_t pos0 = c->n_past;
    linear(m, s, s->q, s->h, l->q, li, LORA_Q, n);
    m->ops->rmsnorm(&m->ctx, s->q, s->q, l->q_norm, n * NH, D, t->rms_eps);
    for (int64_t i = 0; i < n; i++) m->ops->rope(s->q + i * NH * D, NH, D, l->inv_freq, pos0 + i);
    if (!lc->kv_shared) {
        linear(m, s, s->k, s->h, l->k, li, LORA_K, n);
        if (lc->k_eq_v) memcpy(s->v, s->k, (size_t)(n * KVH * D) * sizeof(float));
        else linear(m, s, s->v, s->h, l->v, li, LORA_V, n);
        m->ops->rmsnorm(&m->ctx, s->k, s->k, l->k_norm, n * KVH, D, t->rms_eps);
        m->ops->rmsnorm(&m->ctx, s->v, s->v, NULL, n * KVH, D, t->rms_eps);
        for (int64_t i = 0; i < n; i++) m->ops->rope(s->k + i * KVH * D, KVH, D, l->inv_freq, pos0 + i);
        memcpy(c->k[li] + pos0 * KVH * D, s->k, (size_t)(n * KVH * D) * sizeof(float));
        memcpy(c->v[li] + pos0 * KVH * D, s->v, (size_t)(n * KVH * D) * sizeof(float));
    }
    KnMask mask = {c->valid, t->bidirectional_vision ? c->group : NULL,
                   lc->kind == LAYER_SLIDING ? t->sliding_window : 0};
    if (lc->kind == LAYER_FULL) mask.group = NULL; /* full layers stay causal (§4) */
    int src = lc->store_layer;
    m->ops->attention(&m->ctx, s->att, s->q, c->k[src], c->v[src], n, pos0, pos0 + n, NH, KVH, D, 1.0f, &mask);
    linear(m, s, s->h, s->att, l->o, li, LORA_O, n);
}

/* Feed-forward block of layer li (§3.4, §3.7, §3.8): x += FFN(x) in place. */
static void feed_forward(Model *m, int li, int64_t n, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const Layer *l = &m->layers[li];
    int64_t H = t->hidden_size, I = t->layers[li].intermediate;
    m->ops->rmsnorm(&m->ctx, s->h, s->x, l->pre_ff_ln, n, H, t->rms_eps);
    linear(m, s, s->gate, s->h, l->gate, li, LORA_GATE, n);
    linear(m, s, s->up, s->h, l->up, li, LORA_UP, n);
    m->ops->gelu_tanh(s->gate, (size_t)(n * I));
    for (int64_t i = 0; i < n * I; i++) s->gate[i] *= s->up[i];
    linear(m, s, s->h, s->gate, l->down, li, LORA_DOWN, n);
    if (t->moe) {
        m->ops->rmsnorm(&m->ctx, s->h, s->h, l->post_ff_ln1, n, H, t->rms_eps);
        for (int64_t i = 0; i < n; i++) {
            moe_forward(m, l, s->x + i * H, s->a + i * H, &s->moe);
            for (int64_t j = 0; j < H; j++) s->h[i * H + j] += s->a[i * H + j];
        }
    }
    m->ops->rmsnorm(&m->ctx, s->h, s->h, l->post_ff_ln, n, H, t->rms_eps);
    for (int64_t i = 0; i < n * H; i++) s->x[i] += s->h[i];
}

/* PLE injection at the end of layer li (§3.4). */
static void per_layer_inject(Model *m, int li, int64_t n, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const Layer *l = &m->layers[li];
    int64_t H = t->hidden_size, P = t->ple_dim, L = t->n_layers;
    linear(m, s, s->ple_g, s->x, l->ple_gate, li, LORA_PLE_GATE, n);
    m->ops->gelu_tanh(s->ple_g, (size_t)(n * P));
    for (int64_t i = 0; i < n; i++)
        for (int64_t p = 0; p < P; p++) s->ple_g[i * P + p] *= s->ple[(i * L + li) * P + p];
    linear(m, s, s->h, s->ple_g, l->ple_proj, li, LORA_PLE_PROJ, n);
    m->ops->rmsnorm(&m->ctx, s->h, s->h, l->post_ple_ln, n, H, t->rms_eps);
    for (int64_t i = 0; i < n * H; i++) s->x[i] += s->h[i];
}

static void decoder_layer(Model *m, KvCache *c, int li, int64_t n, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const Layer *l = &m->layers[li];
    int64_t H = t->hidden_size;
    m->ops->rmsnorm(&m->ctx, s->h, s->x, l->input_ln, n, H, t->rms_eps);
    attention(m, c, li, n, s);
    m->ops->rmsnorm(&m->ctx, s->h, s->h, l->post_attn_ln, n, H, t->rms_eps);
    for (int64_t i = 0; i < n * H; i++) s->x[i] += s->h[i];
    feed_forward(m, li, n, s);
    if (t->ple_dim) per_layer_inject(m, li, n, s);
    for (int64_t i = 0; i < n * H; i++) s->x[i] *= l->layer_scalar;
}

/* ---- forward ------------------------------------------------------------------ */

GfStatus model_forward(Model *m, KvCache *c, const ModelInput *in, float *logits, float *hidden, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    int64_t n = in->n, H = t->hidden_size, L = t->n_layers;
    if (n <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "no tokens to run");
    if (c->n_past + n > c->capacity)
        return gf_error_set(err, GF_TOO_LARGE, "context_length_exceeded", NULL, "%lld tokens do not fit the cache of %lld",
                            (long long)(c->n_past + n), (long long)c->capacity);
    Scratch s;
    if (scratch_take(c, m, n, in->lora, &s, err)) return err->status;
    if (embed(m, c, in, s.x, err)) return err->status;
    if (hidden) memcpy(hidden, s.x, (size_t)(n * H) * sizeof(float));
    if (t->ple_dim) model_ple_inputs(m, in, s.x, s.ple, s.lora_tmp);
    for (int li = 0; li < L; li++) {
        decoder_layer(m, c, li, n, &s);
        if (hidden && li < L - 1) memcpy(hidden + (li + 1) * n * H, s.x, (size_t)(n * H) * sizeof(float));
    }
    m->ops->rmsnorm(&m->ctx, s.x, s.x, m->final_norm, n, H, t->rms_eps);
    if (hidden) memcpy(hidden + L * n * H, s.x, (size_t)(n * H) * sizeof(float));
    c->n_past += n;
    if (!logits) return GF_OK;
    int64_t rows = in->last_logits_only ? 1 : n;
    m->ops->matmul(&m->ctx, logits, s.x + (n - rows) * H, m->embed, rows);
    if (t->final_softcap > 0) m->ops->softcap(logits, (size_t)(rows * t->vocab_size), t->final_softcap);
    return GF_OK;
}

static int is_eos(const TextConfig *t, int32_t id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return 1;
    return 0;
}

int model_is_eos(const Model *m, int32_t id) { return is_eos(&m->cfg.text, id); }

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

GfStatus model_generate_greedy_input(Model *m, const ModelInput *prompt, int64_t max_new, int32_t *out, int64_t *n_out,
                                     GfError *err) {
    const TextConfig *t = &m->cfg.text;
    KvCache c;
    *n_out = 0;
    if (kv_cache_init(&c, m, prompt->n + max_new, err)) return err->status;
    float *logits = gf_malloc((size_t)t->vocab_size * sizeof(float), err);
    GfStatus st = logits ? GF_OK : GF_NO_MEMORY;
    ModelInput in = *prompt;
    in.last_logits_only = 1;
    if (!st) st = model_forward(m, &c, &in, logits, NULL, err);
    while (!st && *n_out < max_new) {
        int32_t next = argmax(logits, t->vocab_size);
        out[(*n_out)++] = next;
        if (is_eos(t, next) || *n_out == max_new) break;
        ModelInput step = {.ids = &next, .n = 1, .last_logits_only = 1, .lora = prompt->lora};
        st = model_forward(m, &c, &step, logits, NULL, err);
    }
    free(logits);
    kv_cache_free(&c);
    return st;
}

GfStatus model_generate_greedy(Model *m, const int32_t *prompt, int64_t n_prompt, int64_t max_new, int32_t *out,
                               int64_t *n_out, GfError *err) {
    ModelInput in = {.ids = prompt, .n = n_prompt};
    return model_generate_greedy_input(m, &in, max_new, out, n_out, err);
}
