/* test_alloc_fail.c - out of memory at every allocation, as SQLite's
 * malloc-failure loop: for N = 0, 1, 2, ... the allocator refuses every
 * allocation after the first N, and opening the model, a batched forward,
 * a training step with a validation that grows its workspace and a step
 * after it, and a serving request (submitted with an adapter read
 * from its directory, then admitted and run by the engine thread) must each
 * fail with GF_NO_MEMORY and a message, leave their inputs usable, and (under ASan, which runs this test in CI) leak
 * nothing; the loop ends at the first N that lets the operation finish. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../unit/check.h"
#include <pthread.h>

#include "pipeline.h"
#include "serve.h"
#include "trainer.h"

#define MAX_ROUNDS 20000

typedef GfStatus (*Operation)(void *ctx, GfError *err);

/* Runs op with the allocator failing after N = 0, 1, ... allocations until
 * op succeeds; checks every failure's status and message. Returns the
 * rounds it took. */
static long failure_loop(const char *what, Operation op, void *ctx) {
    long n;
    int bad = 0;
    for (n = 0; n < MAX_ROUNDS; n++) {
        GfError err;
        gf_error_clear(&err);
        gf_alloc_fail_after(n);
        GfStatus st = op(ctx, &err);
        long refused = gf_alloc_failures();
        gf_alloc_fail_after(-1);
        if (st == GF_OK && refused == 0) break;
        if (st == GF_OK) continue; /* a refused allocation the operation could do without */
        if (bad < 12 && (st != GF_NO_MEMORY || !err.message[0])) {
            CHECK(0, "%s, out of memory after %ld allocations: status %s, code %s, message '%s'", what, n, gf_status_name(st), err.code,
                  err.message);
            bad++;
        }
    }
    CHECK(n < MAX_ROUNDS, "%s finished once memory sufficed", what);
    printf("%-28s %5ld allocation points, each failing cleanly\n", what, n);
    return n;
}

/* ---- model open ---- */

static GfStatus open_close(void *ctx, GfError *err) {
    const ModelOptions *mo = ctx;
    Model *m = NULL;
    GfStatus st = model_open(GF_FIXTURES "/dense", mo, &m, err);
    model_close(m);
    return st;
}

/* NF4 left to where it is used (weights.h nf4_later), then a CPU context:
 * the host quantizes then, and may run out there. */
static GfStatus open_later_cpu(void *ctx, GfError *err) {
    (void)ctx;
    GemmaWeights *w = NULL;
    Model *m = NULL;
    ModelOptions mo = {.n_threads = 1, .device = "cpu"};
    GfStatus st = weights_open(GF_FIXTURES "/dense", MODEL_QUANT_NF4, 1, NULL, &w, err);
    if (!st) st = model_new(w, &mo, &m, err);
    model_close(m);
    weights_release(w);
    return st;
}

/* ---- a batched forward: two sequences, one with an adapter ---- */

typedef struct {
    Model *m;
    const LoraBinding *lora;
} ForwardCtx;

static GfStatus forward_two(void *ctx, GfError *err) {
    ForwardCtx *f = ctx;
    const TextConfig *t = &model_config(f->m)->text;
    int32_t a[] = {2, 500, 501, 502, 503}, b[] = {2, 600, 601};
    KvCache ca, cb;
    memset(&ca, 0, sizeof ca);
    memset(&cb, 0, sizeof cb);
    float *logits = gf_malloc(2 * (size_t)t->vocab_size * sizeof(float), err);
    GfStatus st = logits ? GF_OK : GF_NO_MEMORY;
    if (!st) st = kv_cache_init(&ca, t, model_backend(f->m), 16, err);
    if (!st) st = kv_cache_init(&cb, t, model_backend(f->m), 16, err);
    ModelSeq seqs[2] = {{&ca, {.ids = a, .n = 5, .last_logits_only = 1, .lora = f->lora}},
                        {&cb, {.ids = b, .n = 3, .last_logits_only = 1}}};
    if (!st) st = model_forward_batch(f->m, seqs, 2, logits, err);
    kv_cache_free(&ca);
    kv_cache_free(&cb);
    free(logits);
    return st;
}

/* ---- a training step ---- */

typedef struct {
    Pipeline *p;
    TrainSet *set, *val;      /* val's longest example is longer than set's: the workspace grows */
} TrainCtx;

static GfStatus train_step(void *ctx, GfError *err) {
    TrainCtx *c = ctx;
    const char *targets[] = {"q_proj", "v_proj", "down_proj"};
    LoraAdapter *a = NULL;
    Trainer *t = NULL;
    TrainConfig cfg = {.epochs = 1, .batch_size = 2, .grad_accum = 1, .lr = 1e-3, .max_grad_norm = 1.0,
                       .schedule = SCHED_LINEAR, .seed = 9};
    TrainStepInfo info;
    GfStatus st = lora_create(c->p->model, targets, 3, 4, 8.0, 0, 1, &a, err);
    cfg.epochs = 2;
    if (!st) st = trainer_new(c->p->model, a, c->set, &cfg, &t, err);
    if (!st) st = trainer_step(t, NULL, NULL, &info, err);
    double loss;
    if (!st) st = trainer_eval(t, c->val, NULL, NULL, &loss, err);
    if (!st) st = trainer_step(t, NULL, NULL, &info, err); /* on the grown workspace */
    trainer_free(t);
    lora_free(a);
    return st;
}

/* ---- a serving request ---- */

typedef struct {
    ServeEngine *e;
    const char *adapter_dir;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ended;
    GfError end_err;
    int failed;
    int64_t tokens;
} ServeCtx;

static int serve_sink(void *cls, const ServeEvent *ev) {
    ServeCtx *c = cls;
    pthread_mutex_lock(&c->mu);
    if (ev->kind == SERVE_END) {
        c->ended = 1;
        c->failed = ev->error != NULL;
        if (ev->error) c->end_err = *ev->error;
        c->tokens = ev->completion_tokens;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return 0;
}

/* Submits a 4-token prompt with the adapter and waits for its end; the
 * error of submit or of the engine (admission, the step) is the result. */
static GfStatus serve_one(void *ctx, GfError *err) {
    ServeCtx *c = ctx;
    ServeSubmit s = {.n = 4, .max_tokens = 3, .sink = serve_sink, .sink_cls = c};
    snprintf(s.adapter, sizeof s.adapter, "golden");
    snprintf(s.adapter_dir, sizeof s.adapter_dir, "%s", c->adapter_dir);
    s.ids = gf_malloc(4 * sizeof *s.ids, err);
    if (!s.ids) return GF_NO_MEMORY;
    for (int i = 0; i < 4; i++) s.ids[i] = 2 + 100 * i;
    c->ended = c->failed = 0;
    ServeReq *r = NULL;
    GfStatus st = serve_submit(c->e, &s, &r, err);
    if (st) return st;
    pthread_mutex_lock(&c->mu);
    while (!c->ended) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    serve_release(r);
    if (c->failed) {
        *err = c->end_err;
        return err->status;
    }
    return c->tokens > 0 ? GF_OK : gf_error_set(err, GF_INTERNAL, NULL, NULL, "no token generated");
}

static void serving(Model *m) {
    ServeConfig sc;
    serve_config_default(&sc, m);
    sc.max_seqs = 2;
    sc.kv_blocks = 16;
    sc.max_context = 64;
    sc.max_adapters = 0; /* nothing stays resident: every round reads the adapter again */
    GfError err;
    ServeCtx c = {.adapter_dir = GF_FIXTURES "/dense/lora_lm/adapter_final"};
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    CHECK_STATUS(serve_start(m, &sc, &c.e, &err), GF_OK, err);
    if (c.e) {
        failure_loop("serving request", serve_one, &c);
        CHECK_STATUS(serve_one(&c, &err), GF_OK, err); /* the engine still serves */
        ServeStats stats;
        serve_stats(c.e, &stats);
        /* the engine updates its gauges after the step that ended the request */
        for (int i = 0; i < 6000 && (stats.running || stats.queued); i++) {
            usleep(10000);
            serve_stats(c.e, &stats);
        }
        CHECK(stats.running == 0 && stats.queued == 0 && stats.failed > 0, "nothing left running or queued");
    }
    serve_free(c.e);
    pthread_cond_destroy(&c.cv);
    pthread_mutex_destroy(&c.mu);
}

int main(void) {
    GfError err;
    ModelOptions mo = {.n_threads = 1, .quantize = MODEL_QUANT_NF4};
    failure_loop("model_open (dense, nf4)", open_close, &mo);
    ModelOptions on_device = {.n_threads = 1, .quantize = MODEL_QUANT_NF4, .device = "guarded"};
    failure_loop("model_open (nf4 on a device)", open_close, &on_device); /* quantized as it is copied */
    failure_loop("nf4 later, for the cpu", open_later_cpu, NULL);

    Pipeline *p = NULL;
    ModelOptions plain = {.n_threads = 1};
    CHECK_STATUS(pipeline_open(GF_FIXTURES "/dense", &plain, &p, &err), GF_OK, err);
    if (!p) return check_done("test_alloc_fail");
    const char *targets[] = {"q_proj", "o_proj"};
    LoraAdapter *a = NULL;
    LoraBinding lb;
    CHECK_STATUS(lora_create(p->model, targets, 2, 4, 8.0, 0, 3, &a, &err), GF_OK, err);
    CHECK_STATUS(lora_bind(p->model, a, &lb, &err), GF_OK, err);
    ForwardCtx f = {p->model, &lb};
    failure_loop("model_forward_batch", forward_two, &f);
    CHECK_STATUS(forward_two(&f, &err), GF_OK, err); /* the model is still whole */
    lora_binding_free(&lb);
    lora_free(a);
    serving(p->model);

    char path[] = "/tmp/gf-allocfail-XXXXXX", vpath[] = "/tmp/gf-allocfail-val-XXXXXX";
    int fd = mkstemp(path), vfd = mkstemp(vpath);
    FILE *fp = fd >= 0 ? fdopen(fd, "w") : NULL, *vp = vfd >= 0 ? fdopen(vfd, "w") : NULL;
    for (int i = 0; fp && i < 4; i++)
        fprintf(fp, "{\"messages\":[{\"role\":\"user\",\"content\":\"say %d\"},{\"role\":\"assistant\",\"content\":\"ok %d\"}]}\n",
                i, i);
    if (vp)
        fputs("{\"messages\":[{\"role\":\"user\",\"content\":\"say it all\"},{\"role\":\"assistant\",\"content\":"
              "\"ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok\"}]}\n", vp);
    if (fp) fclose(fp);
    if (vp) fclose(vp);
    ImageLimits lim = {20u << 20, 50000000};
    TrainCtx tc = {p, NULL, NULL};
    CHECK_STATUS(trainset_open(p, path, NULL, 256, &lim, TRAINSET_DECODE_IMAGES, &tc.set, &err), GF_OK, err);
    CHECK_STATUS(trainset_open(p, vpath, NULL, 256, &lim, TRAINSET_DECODE_IMAGES, &tc.val, &err), GF_OK, err);
    CHECK(tc.set && tc.val && trainset_max_tokens(tc.val) > trainset_max_tokens(tc.set), "validation grows the workspace");
    if (tc.set && tc.val) failure_loop("trainer step, validation, step", train_step, &tc);
    trainset_close(tc.val);
    trainset_close(tc.set);
    unlink(path);
    unlink(vpath);
    pipeline_close(p);
    return check_done("test_alloc_fail");
}
