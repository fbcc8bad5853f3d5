/* qlora_gap.c - a merged checkpoint against the NF4 base + adapter it was
 * trained on, on a dataset's shortest examples (qlora_gap.h). */
#include "qlora_gap.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcache.h"
#include "lora.h"
#include "pipeline.h"
#include "trainset.h"

#define GAP_MAX_SEQ ((int64_t)1 << 20) /* examples are measured whole; the shortest are chosen */

/* The logits [s->n, vocab] of one example on m with lora (may be NULL). */
static GfStatus example_logits(Model *m, const LoraBinding *lora, const TrainSequence *s, float *logits, GfError *err) {
    const GemmaConfig *g = model_config(m);
    int64_t H = g->text.hidden_size, pp = 3 * (int64_t)g->vision.patch_size * g->vision.patch_size, n_soft = 0;
    KnBuffer soft = {0};
    GfStatus st = GF_OK;
    if (s->n_images)
        st = model_device_alloc(m, &soft, (size_t)(s->n_images * s->n_patches * H) * sizeof(float), "soft tokens", err);
    for (int k = 0; !st && k < s->n_images; k++) {
        int64_t got = 0;
        st = model_vision_forward(m, lora, s->pixels + k * s->n_patches * pp, s->positions + k * s->n_patches * 2,
                                  s->n_patches, (float *)soft.data + n_soft * H, &got, err);
        n_soft += got;
    }
    KvCache c;
    int cache = !st && kv_cache_init(&c, &g->text, model_backend(m), s->n, err) == GF_OK;
    if (!st && !cache) st = err->status;
    if (!st) {
        ModelInput in = {.ids = s->ids, .mm_type = s->mm_type, .soft_tokens = n_soft ? soft.data : NULL, .n = s->n,
                         .lora = lora};
        st = model_forward(m, &c, &in, logits, NULL, err);
    }
    if (cache) kv_cache_free(&c);
    model_device_free(m, &soft);
    return st;
}

static int64_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

typedef struct {
    double diff2, ref2, max_abs;
    int64_t rows, agree;
} Sums;

static void compare(const float *trained, const float *merged, int64_t rows, int64_t V, Sums *s) {
    for (int64_t r = 0; r < rows; r++) {
        const float *a = trained + r * V, *b = merged + r * V;
        for (int64_t v = 0; v < V; v++) {
            double d = (double)b[v] - (double)a[v];
            s->diff2 += d * d;
            s->ref2 += (double)a[v] * (double)a[v];
            if (fabs(d) > s->max_abs) s->max_abs = fabs(d);
        }
        s->agree += argmax(a, V) == argmax(b, V);
        s->rows++;
    }
}

typedef struct {
    int64_t tokens;
    size_t index;
} Length;

static int by_length(const void *x, const void *y) {
    const Length *a = x, *b = y;
    if (a->tokens != b->tokens) return a->tokens < b->tokens ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

/* The indices of the k shortest examples (ties: the earlier line) into
 * out, how many into *n. */
static GfStatus shortest(const TrainSet *t, size_t k, size_t *out, size_t *n, GfError *err) {
    size_t count = trainset_count(t);
    if (!count) return gf_error_set(err, GF_INVALID, "empty_dataset", NULL, "the dataset has no examples to measure on");
    Length *l = gf_calloc(count, sizeof *l, err);
    if (!l) return GF_NO_MEMORY;
    for (size_t i = 0; i < count; i++) l[i] = (Length){trainset_tokens(t, i), i};
    qsort(l, count, sizeof *l, by_length);
    *n = count < k ? count : k;
    for (size_t i = 0; i < *n; i++) out[i] = l[i].index;
    free(l);
    return GF_OK;
}

typedef struct {
    Pipeline *trained;          /* the base in NF4, with the adapter bound below */
    LoraAdapter *a;
    LoraBinding lb;
    Model *merged;
    TrainSet *set;
    float *la, *lb_logits;
    size_t *pick;
} Gap;

static void gap_close(Gap *g) {
    free(g->la);
    free(g->lb_logits);
    free(g->pick);
    trainset_close(g->set);
    model_close(g->merged);
    lora_binding_free(&g->lb);
    lora_free(g->a);
    pipeline_close(g->trained);
}

static GfStatus gap_open(const QloraGapSpec *s, Gap *g, GfError *err) {
    ModelOptions nf4 = {.n_threads = s->n_threads, .quantize = MODEL_QUANT_NF4};
    ModelOptions plain = {.n_threads = s->n_threads, .quantize = MODEL_QUANT_NONE};
    if (pipeline_open(s->base_dir, &nf4, &g->trained, err)) return err->status;
    if (lora_load_dir(s->adapter_dir, g->trained->model, LORA_MAX_RANK, &g->a, err) ||
        lora_bind(g->trained->model, g->a, &g->lb, err) || model_open(s->merged_dir, &plain, &g->merged, err) ||
        trainset_open(g->trained, s->jsonl, s->tar, GAP_MAX_SEQ, &s->image_limits, s->images, &g->set, err))
        return err->status;
    const TextConfig *ta = &model_config(g->trained->model)->text, *tb = &model_config(g->merged)->text;
    if (ta->vocab_size != tb->vocab_size || ta->hidden_size != tb->hidden_size || ta->n_layers != tb->n_layers)
        return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "the merged checkpoint is not a checkpoint of this base");
    return GF_OK;
}

GfStatus qlora_gap_measure(const QloraGapSpec *s, QloraGap *out, GfError *err) {
    memset(out, 0, sizeof *out);
    Gap g;
    memset(&g, 0, sizeof g);
    GfStatus st = s->max_examples >= 1 ? gap_open(s, &g, err)
                                       : gf_error_set(err, GF_INVALID, "invalid_value", NULL, "measure on at least one example");
    size_t k = st ? 0 : (size_t)s->max_examples, n = 0;
    if (!st && !(g.pick = calloc(k, sizeof *g.pick))) st = gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    if (!st) st = shortest(g.set, k, g.pick, &n, err);
    int64_t V = st ? 0 : model_config(g.merged)->text.vocab_size, longest = 0;
    for (size_t i = 0; i < n; i++)
        if (trainset_tokens(g.set, g.pick[i]) > longest) longest = trainset_tokens(g.set, g.pick[i]);
    if (!st && n && (!(g.la = malloc((size_t)(longest * V) * sizeof(float))) ||
                     !(g.lb_logits = malloc((size_t)(longest * V) * sizeof(float)))))
        st = gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for the logits of %lld tokens",
                          (long long)longest);
    Sums sums = {0};
    TrainExample ex;
    memset(&ex, 0, sizeof ex);
    for (size_t i = 0; !st && i < n; i++) {
        st = trainset_example(g.set, g.pick[i], &ex, err);
        if (!st) st = example_logits(g.trained->model, &g.lb, &ex.seq, g.la, err);
        if (!st) st = example_logits(g.merged, NULL, &ex.seq, g.lb_logits, err);
        if (!st) compare(g.la, g.lb_logits, ex.seq.n, V, &sums);
    }
    train_example_free(&ex);
    if (!st) {
        out->n_examples = (int)n;
        out->n_rows = sums.rows;
        out->rel_l2 = sums.ref2 > 0 ? sqrt(sums.diff2 / sums.ref2) : 0.0;
        out->max_abs = sums.max_abs;
        out->top1_agreement = sums.rows ? (double)sums.agree / (double)sums.rows : 0.0;
    }
    gap_close(&g);
    return st;
}
