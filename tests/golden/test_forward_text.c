/* test_forward_text.c - the text model against transformers 5.17 for the
 * dense, ple and moe golden models: logits at every unpadded position, a
 * layer-by-layer report against hidden_states naming the first layer that
 * diverges, KV-cache decoding (prefill + one token at a time) against the
 * full forward, and the greedy continuation of generate.json. */
#include <math.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

#include "../unit/check.h"
#include "golden.h"
#include "jsoncheck.h"
#include "model.h"
#include "model_impl.h"
#include "nf4.h"
#include "safetensors.h"

typedef struct {
    SafeTensors st;
    int64_t B, T;
    int32_t *ids;       /* [B, T] */
    uint8_t *valid;     /* [B, T] */
    const float *hidden, *logits;
    SafeTensors st16;   /* forward_text_bf16.safetensors (tools/gen_bf16_golden.py), read in bf16 */
    const float *hidden16, *logits16;
} Golden;

static const float *f32(const SafeTensors *st, const char *name) {
    const StTensor *t = safetensors_find(st, name);
    return t && t->dtype == ST_F32 ? (const float *)t->data : NULL;
}

static int load_golden(const char *path, Golden *g) {
    GfError err;
    if (safetensors_open(path, "forward_text", &g->st, &err)) { fprintf(stderr, "%s\n", err.message); return -1; }
    const StTensor *ids = safetensors_find(&g->st, "input_ids"), *mask = safetensors_find(&g->st, "attention_mask");
    if (!ids || ids->dtype != ST_I64 || !mask) return -1;
    g->B = (int64_t)ids->shape[0];
    g->T = (int64_t)ids->shape[1];
    g->ids = malloc((size_t)(g->B * g->T) * sizeof *g->ids);
    g->valid = malloc((size_t)(g->B * g->T));
    for (int64_t i = 0; i < g->B * g->T; i++) {
        int64_t v, mk;
        memcpy(&v, ids->data + 8 * i, 8);
        memcpy(&mk, mask->data + 8 * i, 8);
        g->ids[i] = (int32_t)v;
        g->valid[i] = (uint8_t)mk;
    }
    g->hidden = f32(&g->st, "hidden_states");
    g->logits = f32(&g->st, "logits");
    return g->hidden && g->logits ? 0 : -1;
}

/* The BF16 precision's golden forward beside path's (forward_text.safetensors
 * -> forward_text_bf16.safetensors), shapes checked against the float32 one. */
static int load_golden_bf16(const char *path, Golden *g) {
    char p16[700];
    GfError err;
    size_t n = strlen(path) - strlen(".safetensors");
    snprintf(p16, sizeof p16, "%.*s_bf16.safetensors", (int)n, path);
    if (safetensors_open(p16, "forward_text_bf16", &g->st16, &err)) { fprintf(stderr, "%s\n", err.message); return -1; }
    const StTensor *a = safetensors_find(&g->st, "logits"), *b = safetensors_find(&g->st16, "logits");
    const StTensor *c = safetensors_find(&g->st, "hidden_states"), *d = safetensors_find(&g->st16, "hidden_states");
    if (!a || !b || !c || !d || a->n_bytes != b->n_bytes || c->n_bytes != d->n_bytes) return -1;
    g->hidden16 = f32(&g->st16, "hidden_states");
    g->logits16 = f32(&g->st16, "logits");
    return g->hidden16 && g->logits16 ? 0 : -1;
}

static int bf16(const Model *m) { return model_backend(m)->ctx.precision == KN_PRECISION_BF16; }

/* A full forward's got against its golden: in fp32 the float32 golden, max
 * abs error <= fp32_limit of max |ref|; in the BF16 precision the golden of
 * that precision (ref16: bf16 matmul operands, float32 sums, an exact
 * prefill attention and MoE router), relative L2 <= GOLDEN_BF16_PREC_REL
 * (golden.h), the MoE model too: its routing is the reference's. */
static int compare(const Model *m, const char *what, const float *got, const float *ref, const float *ref16, size_t n,
                   size_t stride, const uint8_t *use, double fp32_limit) {
    if (!bf16(m)) return golden_report(what, got, ref, n, stride, use, fp32_limit);
    return golden_report_l2(what, got, ref16, n, stride, use, GOLDEN_BF16_PREC_REL);
}

/* Full forward of row b; compares logits and every hidden state. */
static void check_row(Model *m, const Golden *g, int64_t b, float *logits_out, const char *variant) {
    const TextConfig *t = &model_config(m)->text;
    int64_t T = g->T, V = t->vocab_size, H = t->hidden_size, L = t->n_layers;
    KvCache c;
    GfError err;
    CHECK_STATUS(kv_cache_init(&c, &model_config(m)->text, model_backend(m), T, &err), GF_OK, err);
    float *hidden = malloc((size_t)((L + 1) * T * H) * sizeof(float));
    ModelInput in = {.ids = g->ids + b * T, .valid = g->valid + b * T, .n = T};
    CHECK_STATUS(model_forward(m, &c, &in, logits_out, hidden, &err), GF_OK, err);
    char what[96];
    int first_bad = -1;
    float *ref_h = malloc((size_t)(T * H) * sizeof(float));
    for (int64_t j = 0; j <= L; j++) {
        /* golden hidden_states is [L+1, B, T, H] */
        memcpy(ref_h, g->hidden + ((j * g->B + b) * T) * H, (size_t)(T * H) * sizeof(float));
        snprintf(what, sizeof what, "%s row %lld hidden[%lld]", variant, (long long)b, (long long)j);
        const float *ref16 = g->hidden16 ? g->hidden16 + ((j * g->B + b) * T) * H : NULL;
        if (!compare(m, what, hidden + j * T * H, ref_h, ref16, (size_t)(T * H), (size_t)H, g->valid + b * T,
                     GOLDEN_LOGITS_REL) &&
            first_bad < 0)
            first_bad = (int)j;
    }
    if (first_bad >= 0)
        printf("%s row %lld: first divergence at hidden_states[%d] = %s\n", variant, (long long)b, first_bad,
               first_bad == 0 ? "the embeddings" : first_bad == L ? "the final norm" : "the output of a decoder layer");
    snprintf(what, sizeof what, "%s row %lld logits", variant, (long long)b);
    CHECK(compare(m, what, logits_out, g->logits + b * T * V, g->logits16 ? g->logits16 + b * T * V : NULL,
                  (size_t)(T * V), (size_t)V, g->valid + b * T, GOLDEN_LOGITS_REL),
          "%s logits", variant);
    if (bf16(m) && g->logits16) { /* the precision it claims: nearer its own golden than float32's */
        double to16 = golden_rel_l2(logits_out, g->logits16 + b * T * V, (size_t)(T * V), (size_t)V, g->valid + b * T);
        double to32 = golden_rel_l2(logits_out, g->logits + b * T * V, (size_t)(T * V), (size_t)V, g->valid + b * T);
        printf("%-40s rel L2 %.2e to the BF16 golden, %.2e to the float32 one\n", what, to16, to32);
        CHECK(to16 < to32, "%s row %lld: bf16 logits nearer the float32 golden (%.2e) than the BF16 one (%.2e)", variant,
              (long long)b, to32, to16);
    }
    free(ref_h);
    free(hidden);
    kv_cache_free(&c);
}

/* Prefill of the first `split` tokens, then one token at a time. */
static void check_kv_decoding(Model *m, const Golden *g, int64_t b, const float *full, const char *variant, int64_t split) {
    const TextConfig *t = &model_config(m)->text;
    int64_t T = g->T, V = t->vocab_size;
    KvCache c;
    GfError err;
    CHECK_STATUS(kv_cache_init(&c, &model_config(m)->text, model_backend(m), T, &err), GF_OK, err);
    float *logits = malloc((size_t)(T * V) * sizeof(float));
    ModelInput pre = {.ids = g->ids + b * T, .valid = g->valid + b * T, .n = split};
    CHECK_STATUS(model_forward(m, &c, &pre, logits, NULL, &err), GF_OK, err);
    for (int64_t i = split; i < T; i++) {
        ModelInput step = {.ids = g->ids + b * T + i, .valid = g->valid + b * T + i, .n = 1};
        CHECK_STATUS(model_forward(m, &c, &step, logits + i * V, NULL, &err), GF_OK, err);
    }
    char what[96];
    snprintf(what, sizeof what, "%s row %lld kv-cache (prefill %lld)", variant, (long long)b, (long long)split);
    if (!bf16(m)) {
        CHECK(golden_report(what, logits, full, (size_t)(T * V), (size_t)V, g->valid + b * T, GOLDEN_KV_REL), "%s", what);
    } else {
        /* a decode step's few rows take the GEMV, which does not round x:
         * against the float32 golden (keys and values may be bf16), the MoE
         * model reported, as rounded keys and values move its routing */
        int ok = golden_report_l2(what, logits, g->logits + b * T * V, (size_t)(T * V), (size_t)V, g->valid + b * T,
                                  GOLDEN_BF16_REL);
        if (!ok && model_config(m)->text.moe) printf("%-40s not held in bf16: MoE routing (GEMMA4.md 13)\n", what);
        else CHECK(ok, "%s", what);
    }
    free(logits);
    kv_cache_free(&c);
}

/* The MoE block three tokens per call gives what one call over the whole
 * row gives: each token's routing and experts do not depend on the others
 * in its call (bit for bit on the CPU backends; within 1e-5 on a device,
 * in bf16 too: the router's matmul is exact, its kernel the same for every
 * row count, and the experts' products are per row). */
static void check_moe_chunks(Model *m3, const Golden *g, int64_t b, const float *full) {
    int64_t T = g->T, V = model_config(m3)->text.vocab_size;
    KvCache c;
    GfError err;
    CHECK_STATUS(kv_cache_init(&c, &model_config(m3)->text, model_backend(m3), T, &err), GF_OK, err);
    float *logits = malloc((size_t)(T * V) * sizeof(float));
    ModelInput in = {.ids = g->ids + b * T, .valid = g->valid + b * T, .n = T};
    CHECK_STATUS(model_forward(m3, &c, &in, logits, NULL, &err), GF_OK, err);
    const char *be = model_backend(m3)->name;
    double tol = strcmp(be, "cpu") == 0 || strcmp(be, "guarded") == 0 ? 0.0 : 1e-5, worst = 0, scale = 0;
    for (int64_t i = 0; i < T * V; i++) {
        double d = fabs((double)logits[i] - full[i]);
        worst = d > worst ? d : worst;
        scale = fabs(full[i]) > scale ? fabs(full[i]) : scale;
    }
    CHECK(worst <= tol * scale, "moe row %lld: 3 tokens per MoE call differ from one call by %g (max |logit| %g)",
          (long long)b, worst, scale);
    free(logits);
    kv_cache_free(&c);
}

static void check_generate(Model *m, const char *dir, const char *variant) {
    char path[700];
    snprintf(path, sizeof path, "%s/generate.json", dir);
    FILE *f = fopen(path, "rb");
    char buf[8192];
    size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (f) fclose(f);
    GfError err;
    cJSON *j = json_parse_strict(buf, n, "generate.json", &err);
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(j, "text");
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(text, "prompt"), *want = cJSON_GetObjectItemCaseSensitive(text, "output");
    CHECK(prompt && want, "%s generate.json", variant);
    if (!prompt || !want) { cJSON_Delete(j); return; }
    int32_t ids[256], out[256];
    int64_t np = 0, n_out = 0, nw = cJSON_GetArraySize(want);
    for (const cJSON *e = prompt->child; e; e = e->next) ids[np++] = (int32_t)e->valuedouble;
    CHECK_STATUS(model_generate_greedy(m, ids, np, nw, out, &n_out, &err), GF_OK, err);
    int same = n_out == nw;
    int64_t i = 0;
    for (const cJSON *e = want->child; e && same; e = e->next, i++) same = out[i] == (int32_t)e->valuedouble;
    printf("%-40s %lld tokens %s\n", "greedy text continuation", (long long)n_out, same ? "OK" : "NOT OK");
    CHECK(same, "%s greedy continuation differs from generate.json", variant);
    cJSON_Delete(j);
}

static void run_variant(const char *variant) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, GF_FIXTURES "/%s", variant);
    snprintf(path, sizeof path, "%s/forward_text.safetensors", dir);
    Model *m = NULL;
    GfError err;
    ModelOptions opts = {.n_threads = 2, .quantize = MODEL_QUANT_NONE};
    CHECK_STATUS(model_open(dir, &opts, &m, &err), GF_OK, err);
    Golden g = {0};
    CHECK(load_golden(path, &g) == 0, "%s golden file", variant);
    if (!m) return;
    if (bf16(m)) CHECK(load_golden_bf16(path, &g) == 0, "%s: the BF16 precision's golden file", variant);
    int64_t V = model_config(m)->text.vocab_size;
    float *logits = malloc((size_t)(g.T * V) * sizeof(float));
    Model *m3 = NULL;
    ModelOptions three = opts;
    three.moe_chunk = 3;
    if (model_config(m)->text.moe) CHECK_STATUS(model_open(dir, &three, &m3, &err), GF_OK, err);
    for (int64_t b = 0; b < g.B; b++) {
        check_row(m, &g, b, logits, variant);
        if (m3) check_moe_chunks(m3, &g, b, logits);
        check_kv_decoding(m, &g, b, logits, variant, 1);
        check_kv_decoding(m, &g, b, logits, variant, 7);
    }
    if (model_backend(m)->ctx.precision == KN_PRECISION_FP32) check_generate(m, dir, variant);
    else printf("%-40s fp32 precision only\n", "greedy text continuation");
    model_close(m3);
    free(logits);
    free(g.ids);
    free(g.valid);
    safetensors_close(&g.st);
    if (g.logits16) safetensors_close(&g.st16);
    model_close(m);
}

/* The ple model's logits of golden row 0 with its per-layer embedding
 * table where ple says, and what its weights' copy held while open: bytes
 * of device memory and of mapped host memory, and the table's own bytes. */
typedef struct {
    float *logits;
    int64_t n;
    uint64_t device, mapped, table;
} PleRun;

static PleRun ple_run(const char *ple) {
    PleRun r = {0};
    Model *m = NULL;
    GfError err;
    WeightsGauge gauge = {0};
    ModelOptions opts = {.n_threads = 2, .ple = ple, .gauge = &gauge};
    CHECK_STATUS(model_open(GF_FIXTURES "/ple", &opts, &m, &err), GF_OK, err);
    Golden g;
    int golden = load_golden(GF_FIXTURES "/ple/forward_text.safetensors", &g) == 0;
    CHECK(golden, "ple golden file%s", "");
    if (m && golden) {
        const TextConfig *t = &model_config(m)->text;
        /* [ple vocab, layers * ple dim], in the checkpoint's dtype */
        r.table = (uint64_t)t->ple_vocab * (uint64_t)(t->n_layers * t->ple_dim) *
                  kn_dtype_size(model_weights(m)->host.embed_ple.dtype);
        r.n = g.T * t->vocab_size;
        r.logits = malloc((size_t)r.n * sizeof(float));
        KvCache c;
        ModelInput in = {.ids = g.ids, .valid = g.valid, .n = g.T};
        CHECK_STATUS(kv_cache_init(&c, t, model_backend(m), g.T, &err), GF_OK, err);
        CHECK_STATUS(model_forward(m, &c, &in, r.logits, NULL, &err), GF_OK, err);
        kv_cache_free(&c);
        r.device = atomic_load(&gauge.device_bytes);
        r.mapped = atomic_load(&gauge.mapped_bytes);
    }
    if (golden) {
        free(g.ids);
        free(g.valid);
        safetensors_close(&g.st);
    }
    model_close(m);
    return r;
}

/* On a device other than the CPU, the per-layer embedding table stays in
 * host memory the device reads (ple "host", the default) or goes to the
 * device ("device"): the same logits bit for bit, and the gauge counts the
 * table apart from the device bytes. */
static void test_ple_placement(void) {
    PleRun h = ple_run("host"), d = ple_run("device");
    CHECK(h.logits && d.logits && h.n == d.n && memcmp(h.logits, d.logits, (size_t)h.n * sizeof *h.logits) == 0,
          "the ple model's logits do not depend on where its per-layer table is%s", "");
    if (!d.device) {
        printf("%-40s %s\n", "per-layer table placement", "the CPU reads the host's weights: nothing to place");
    } else {
        CHECK(h.mapped >= h.table && h.mapped < h.table + 256, "mapped %llu bytes for a table of %llu",
              (unsigned long long)h.mapped, (unsigned long long)h.table);
        CHECK(d.mapped == 0, "ple \"device\" maps nothing%s", "");
        CHECK(h.device + h.mapped == d.device, "device bytes %llu + mapped %llu != %llu with the table on the device",
              (unsigned long long)h.device, (unsigned long long)h.mapped, (unsigned long long)d.device);
        printf("%-40s %llu bytes in host memory, %llu on the device\n", "per-layer table placement",
               (unsigned long long)h.mapped, (unsigned long long)h.device);
    }
    free(h.logits);
    free(d.logits);
}

/* Golden row 0's logits through a new context on w on device. */
static float *nf4_logits(GemmaWeights *w, const char *device, const Golden *g, int64_t *n) {
    Model *m = NULL;
    GfError err;
    ModelOptions o = {.n_threads = 2, .device = device, .precision = "fp32"}; /* the CPU kinds' only precision */
    CHECK_STATUS(model_new(w, &o, &m, &err), GF_OK, err);
    if (!m) return NULL;
    const TextConfig *t = &model_config(m)->text;
    *n = g->T * t->vocab_size;
    float *logits = malloc((size_t)*n * sizeof *logits);
    KvCache c;
    ModelInput in = {.ids = g->ids, .valid = g->valid, .n = g->T};
    CHECK_STATUS(kv_cache_init(&c, t, model_backend(m), g->T, &err), GF_OK, err);
    CHECK_STATUS(model_forward(m, &c, &in, logits, NULL, &err), GF_OK, err);
    kv_cache_free(&c);
    model_close(m);
    return logits;
}

/* The host's NF4 arrays of a and b hold the same bytes. */
static int same_nf4(const GemmaWeights *a, const GemmaWeights *b) {
    int same = a->n_nf4 == b->n_nf4 && a->n_nf4 > 0;
    for (size_t i = 0; same && i < a->n_nf4; i++) {
        const KnNf4 *p = &a->nf4[i], *q = &b->nf4[i];
        same = p->n == q->n && !memcmp(&p->offset, &q->offset, sizeof p->offset) &&
               !memcmp(p->codes, q->codes, (size_t)(p->n + 1) / 2) && !memcmp(p->absmax_q, q->absmax_q, (size_t)p->n_blocks) &&
               !memcmp(p->group_scale, q->group_scale, (size_t)p->n_groups * sizeof(float));
    }
    return same;
}

/* NF4 weights quantized where they are used (weights_open's nf4_later):
 * by the device's backend as the first context there uploads them, and by
 * the host's cores for the first CPU context, in either order. The same
 * bits as quantized at open: the host's arrays byte for byte, and the
 * logits of every context equal. Counted at the NF4 size from the start. */
static void test_nf4_where(const char *variant) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, GF_FIXTURES "/%s", variant);
    snprintf(path, sizeof path, "%s/forward_text.safetensors", dir);
    Golden g;
    GfError err;
    CHECK(load_golden(path, &g) == 0, "%s golden file", variant);
    GemmaWeights *now = NULL, *later[2] = {NULL, NULL};
    CHECK_STATUS(weights_open(dir, MODEL_QUANT_NF4, 0, NULL, &now, &err), GF_OK, err);
    for (int i = 0; i < 2; i++) CHECK_STATUS(weights_open(dir, MODEL_QUANT_NF4, 1, NULL, &later[i], &err), GF_OK, err);
    if (!now || !later[0] || !later[1]) return;
    CHECK(weights_nf4_later(later[0]) && !later[0]->nf4[0].codes && !weights_nf4_later(now),
          "%s: deferred NF4 leaves the host's arrays unmade until a CPU context needs them", variant);
    CHECK(weights_resident_bytes(later[0]) == weights_resident_bytes(now), "%s: deferred NF4 counted as NF4 (%llu, %llu)",
          variant, (unsigned long long)weights_resident_bytes(later[0]), (unsigned long long)weights_resident_bytes(now));
    int64_t n = 0, n1;
    float *ref = nf4_logits(now, "cpu", &g, &n);
    /* later[0]: the device first (quantized there), then the CPU; later[1]: the CPU first, then the device */
    float *dev0 = nf4_logits(later[0], "guarded", &g, &n1);
    CHECK(!atomic_load(&later[0]->nf4_host_ready), "%s: quantizing on the device leaves the host's arrays alone", variant);
    float *cpu0 = nf4_logits(later[0], "cpu", &g, &n1);
    float *cpu1 = nf4_logits(later[1], "cpu", &g, &n1);
    float *dev1 = nf4_logits(later[1], "guarded", &g, &n1);
    CHECK(same_nf4(now, later[0]) && same_nf4(now, later[1]), "%s: the host's NF4 arrays quantized later are the same bytes",
          variant);
    float *runs[] = {dev0, cpu0, cpu1, dev1};
    const char *names[] = {"on the device", "on the host after the device", "on the host", "on the device after the host"};
    for (int i = 0; i < 4; i++)
        CHECK(ref && runs[i] && !memcmp(ref, runs[i], (size_t)n * sizeof *ref),
              "%s: logits of NF4 quantized %s equal those quantized at open", variant, names[i]);
    for (int i = 0; i < 4; i++) free(runs[i]);
    free(ref);
    weights_release(now);
    weights_release(later[0]);
    weights_release(later[1]);
    free(g.ids);
    free(g.valid);
    safetensors_close(&g.st);
}

/* Writes into open weights: a widened norm vector (0), a bf16 matrix of the
 * checkpoint (1), an NF4 linear's codes (2). */
static void write_weights(int what) {
    GfError err;
    Model *m = NULL;
    ModelOptions mo = {.n_threads = 1, .device = "cpu", .precision = "fp32",
                       .quantize = what == 2 ? MODEL_QUANT_NF4 : MODEL_QUANT_NONE};
    if (model_open(GF_FIXTURES "/dense", &mo, &m, &err)) _exit(3);
    const GemmaWeights *w = model_weights(m);
    if (what == 0) w->host.final_norm[0] = 2.0f;
    else if (what == 1) ((uint16_t *)w->host.layers[0].q.data)[0] ^= 1;
    else ((KnNf4 *)w->host.layers[0].q.data)->codes[0] ^= 1;
}

/* An NF4 linear's codes quantized for a CPU context after the weights
 * opened (deferred): read-only too. */
static void write_later_nf4(int unused) {
    (void)unused;
    GfError err;
    GemmaWeights *w = NULL;
    Model *m = NULL;
    ModelOptions mo = {.n_threads = 1, .device = "cpu", .precision = "fp32"};
    if (weights_open(GF_FIXTURES "/dense", MODEL_QUANT_NF4, 1, NULL, &w, &err) || model_new(w, &mo, &m, &err)) _exit(3);
    ((KnNf4 *)w->host.layers[0].q.data)->codes[0] ^= 1;
}

/* Opened weights are read-only: each write kills the process that tries, so
 * no engine bug can change the base that serving and training share. */
static void test_weights_read_only(void) {
    const char *names[] = {"a widened vector", "a mapped bf16 matrix", "an NF4 linear's codes"};
    for (int what = 0; what < 3; what++)
        CHECK(check_segfaults(write_weights, what), "writing %s of open weights faults", names[what]);
    CHECK(check_segfaults(write_later_nf4, 0), "writing an NF4 linear's codes quantized after open faults%s", "");
}

int main(void) {
    test_weights_read_only();
    run_variant("dense");
    run_variant("ple");
    run_variant("moe");
    test_ple_placement();
    test_nf4_where("dense");
    test_nf4_where("moe");
    return check_done("test_forward_text");
}
