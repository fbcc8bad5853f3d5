/* test_serve.c - the serving engine under concurrent requests on the tiny
 * dense model: 24 requests over the base and four adapters (three handed
 * over in memory, one loaded from its directory on first use), text and
 * image prompts, submitted at once into 6 slots so that they join and leave
 * the running batch as others finish. Each greedy answer must equal the same
 * prompt generated alone (model_generate_greedy_input with its adapter);
 * the same seed at temperature 1 gives the same tokens in different
 * batches; a full queue refuses with queue_full; a cancelled request ends
 * cancelled; a broken adapter is refused at submit, on the caller's
 * thread; and every KV block is back in the pool at the end. The vision
 * cache keeps the tower's output per image digest within its byte budget,
 * least recently used out first, and a hit answers as the tower would. A
 * pool that holds one sequence at its longest preempts sequences as they
 * grow, and each resumes with exactly the tokens a roomy pool gives. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../unit/check.h"
#include "golden_inputs.h"
#include "lora.h"
#include "model.h"
#include "safetensors.h"
#include "serve.h"

#define N_REQ 24
#define MAX_NEW 12

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int32_t tokens[64];
    int n, done, cancel_after;
    FinishReason finish;
    char error_code[64];
    ServeReq *handle;
} Result;

static int sink(void *cls, const ServeEvent *ev) {
    Result *r = cls;
    pthread_mutex_lock(&r->mu);
    if (ev->kind == SERVE_TOKEN && r->n < 64) r->tokens[r->n++] = ev->token;
    if (ev->kind == SERVE_END) {
        r->done = 1;
        r->finish = ev->finish;
        if (ev->error) snprintf(r->error_code, sizeof r->error_code, "%s", ev->error->code);
        pthread_cond_signal(&r->cv);
    }
    int stop = r->cancel_after && r->n >= r->cancel_after;
    pthread_mutex_unlock(&r->mu);
    if (stop && r->handle) serve_cancel(r->handle);
    return 0;
}

static void wait_done(Result *r) {
    pthread_mutex_lock(&r->mu);
    while (!r->done) pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

static uint64_t rs = 12345;
static float rnd(void) {
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rs >> 40) & 0xFFFFFF) / 16777216.0f - 0.5f;
}

static LoraAdapter *random_adapter(Model *m, const char *target, int rank) {
    LoraAdapter *a = NULL;
    GfError err;
    const char *t[] = {target};
    CHECK_STATUS(lora_create(m, t, 1, rank, 2.0 * rank, 0, 11, &a, &err), GF_OK, err);
    for (size_t i = 0; a && i < a->n_pairs; i++)
        for (int64_t j = 0; j < a->pairs[i].out * a->pairs[i].rank; j++) a->pairs[i].B[j] = 0.1f * rnd();
    return a;
}

typedef struct {
    int32_t ids[128];
    uint8_t types[128];
    int64_t n;
    int image;
} Prompt1;

static void make_prompt(Prompt1 *p, int q, const SafeTensors *img) {
    if (q % 3 == 2) {
        p->n = (int64_t)safetensors_find(img, "input_ids")->shape[1] - 8;
        golden_prompt(img, p->n, p->ids, p->types);
        p->image = 1;
        return;
    }
    p->n = 4 + (q * 7) % 40;
    p->ids[0] = 2;
    for (int64_t i = 1; i < p->n; i++) p->ids[i] = 300 + (int32_t)((q * 97 + i * 13) % 700);
    memset(p->types, 0, sizeof p->types);
    p->image = 0;
}

/* max_tokens of submit's requests. */
static int64_t g_max_new = MAX_NEW;

/* The digest the next submitted image carries (its vision cache key); 0 = none. */
static int g_image_label;

/* The one image of forward_image.safetensors as the engine takes it. */
static ServeImage *image_of(const SafeTensors *st) {
    ServeImage *im = calloc(1, sizeof *im);
    im->n_patches = golden_image(st, &im->pixels, &im->positions);
    im->n_soft = 60;
    if (g_image_label) {
        memset(im->digest, g_image_label, sizeof im->digest);
        im->has_digest = 1;
    }
    return im;
}

static GfStatus submit(ServeEngine *e, const Prompt1 *p, const SafeTensors *img, const char *adapter, const char *dir,
                       float temperature, uint64_t seed, Result *r, GfError *err) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    ServeSubmit s = {.n = p->n, .max_tokens = g_max_new, .sample = {temperature, 1.0f, 0}, .seed = seed, .sink = sink,
                     .sink_cls = r};
    s.ids = malloc((size_t)p->n * sizeof *s.ids);
    s.mm_type = malloc((size_t)p->n);
    memcpy(s.ids, p->ids, (size_t)p->n * sizeof *s.ids);
    memcpy(s.mm_type, p->types, (size_t)p->n);
    if (p->image) {
        s.images = image_of(img);
        s.n_images = 1;
    }
    snprintf(s.adapter, sizeof s.adapter, "%s", adapter ? adapter : "");
    snprintf(s.adapter_dir, sizeof s.adapter_dir, "%s", dir ? dir : "");
    return serve_submit(e, &s, &r->handle, err);
}

/* Greedy alone, with the adapter bound here. */
static void alone(Model *m, const Prompt1 *p, const SafeTensors *img, const LoraBinding *lb, int32_t *out, int64_t *n_out) {
    GfError err;
    float *soft = NULL;
    KnBuffer soft_buf = {0};
    if (p->image) {
        ServeImage *im = image_of(img);
        CHECK_STATUS(model_device_alloc(m, &soft_buf, (size_t)(60 * model_config(m)->text.hidden_size) * sizeof(float),
                                        "soft", &err), GF_OK, err);
        soft = soft_buf.data;
        int64_t got;
        CHECK_STATUS(model_vision_forward(m, lb, im->pixels, im->positions, im->n_patches, soft, &got, &err), GF_OK, err);
        free(im->pixels); free(im->positions); free(im);
    }
    ModelInput in = {.ids = p->ids, .mm_type = p->types, .soft_tokens = soft, .n = p->n, .lora = lb};
    CHECK_STATUS(model_generate_greedy_input(m, &in, MAX_NEW, out, n_out, &err), GF_OK, err);
    if (*n_out && model_is_eos(m, out[*n_out - 1])) (*n_out)--; /* the engine does not emit the eos */
    model_device_free(m, &soft_buf);
}

/* A request whose sink holds the engine thread at its 1st and 2nd tokens
 * until the test opens the gate (tests only: sinks must not block). */
typedef struct {
    Result r;
    int at;                   /* the token count the engine is held at, 0 = running */
    int open;                 /* gates opened so far */
} Gated;

static int gated_sink(void *cls, const ServeEvent *ev) {
    Gated *g = cls;
    pthread_mutex_lock(&g->r.mu);
    if (ev->kind == SERVE_TOKEN) g->r.n++;
    if (ev->kind == SERVE_END) g->r.done = 1;
    if (ev->kind == SERVE_TOKEN && g->r.n <= 2) {
        g->at = g->r.n;
        pthread_cond_broadcast(&g->r.cv);
        while (g->open < g->r.n) pthread_cond_wait(&g->r.cv, &g->r.mu);
        g->at = 0;
    }
    pthread_cond_broadcast(&g->r.cv);
    pthread_mutex_unlock(&g->r.mu);
    return 0;
}

static void gate_wait(Gated *g, int at) {
    pthread_mutex_lock(&g->r.mu);
    while (g->at != at) pthread_cond_wait(&g->r.cv, &g->r.mu);
    pthread_mutex_unlock(&g->r.mu);
}

static void gate_open(Gated *g) {
    pthread_mutex_lock(&g->r.mu);
    g->open++;
    pthread_cond_broadcast(&g->r.cv);
    pthread_mutex_unlock(&g->r.mu);
}

static ServeSubmit small_submit(const Prompt1 *p, ServeSink sink, void *cls) {
    ServeSubmit s = {.n = p->n, .max_tokens = MAX_NEW, .sink = sink, .sink_cls = cls};
    s.ids = malloc((size_t)p->n * sizeof *s.ids);
    memcpy(s.ids, p->ids, (size_t)p->n * sizeof *s.ids);
    return s;
}

/* One sequence slot, a queue of two: requests cancelled while queued (their
 * clients hung up) give their queue slots back at the engine's next step,
 * while the running sequence still runs, not only when a slot frees. */
static void test_cancelled_leave_queue(Model *m, const Prompt1 *text) {
    ServeConfig cfg;
    serve_config_default(&cfg, m);
    cfg.max_seqs = 1;
    cfg.max_queue = 2;
    ServeEngine *e = NULL;
    GfError err;
    CHECK_STATUS(serve_start(m, &cfg, &e, &err), GF_OK, err);
    if (!e) return;
    Gated a = {0};
    Result b, c, d;
    Result *rs_[3] = {&b, &c, &d};
    for (int i = 0; i < 3; i++) {
        memset(rs_[i], 0, sizeof *rs_[i]);
        pthread_mutex_init(&rs_[i]->mu, NULL);
        pthread_cond_init(&rs_[i]->cv, NULL);
    }
    pthread_mutex_init(&a.r.mu, NULL);
    pthread_cond_init(&a.r.cv, NULL);
    ServeSubmit s = small_submit(text, gated_sink, &a);
    CHECK_STATUS(serve_submit(e, &s, &a.r.handle, &err), GF_OK, err);
    gate_wait(&a, 1); /* the engine holds at A's first token: A runs, the slot is taken */
    s = small_submit(text, sink, &b);
    CHECK_STATUS(serve_submit(e, &s, &b.handle, &err), GF_OK, err);
    s = small_submit(text, sink, &c);
    CHECK_STATUS(serve_submit(e, &s, &c.handle, &err), GF_OK, err);
    s = small_submit(text, sink, &d);
    CHECK(serve_submit(e, &s, &d.handle, &err) == GF_BUSY, "the queue of two is full");
    serve_cancel(b.handle);
    serve_cancel(c.handle);
    gate_open(&a);
    gate_wait(&a, 2); /* one engine step later */
    ServeStats st;
    serve_stats(e, &st);
    CHECK(b.done && c.done && b.finish == FINISH_CANCELLED && c.finish == FINISH_CANCELLED && !a.r.done && st.queued == 0,
          "hung-up queued requests left the queue while A runs (B %d, C %d, A done %d, queued %d)", b.done, c.done,
          a.r.done, st.queued);
    s = small_submit(text, sink, &d);
    CHECK_STATUS(serve_submit(e, &s, &d.handle, &err), GF_OK, err);
    gate_open(&a);
    wait_done(&a.r);
    wait_done(&d);
    CHECK(a.r.n == MAX_NEW && d.n > 0, "A and the next request are served (%d, %d tokens)", a.r.n, d.n);
    serve_release(a.r.handle);
    serve_release(b.handle);
    serve_release(c.handle);
    serve_release(d.handle);
    serve_free(e);
}

/* A cache of one image's features: labels A, B, A, A give miss, miss (A
 * evicted), miss, hit; every answer is the same (the same pixels). */
static void test_vision_cache_lru(Model *m, const Prompt1 *p, const SafeTensors *img) {
    GfError err;
    ServeConfig cfg;
    serve_config_default(&cfg, m);
    cfg.vision_cache_bytes = (uint64_t)(60 * model_config(m)->text.hidden_size) * sizeof(float);
    ServeEngine *e = NULL;
    CHECK_STATUS(serve_start(m, &cfg, &e, &err), GF_OK, err);
    if (!e) return;
    static const int labels[4] = {'A', 'B', 'A', 'A'};
    Result r[4];
    for (int i = 0; i < 4; i++) {
        g_image_label = labels[i];
        CHECK_STATUS(submit(e, p, img, NULL, NULL, 0.0f, 0, &r[i], &err), GF_OK, err);
        wait_done(&r[i]);
        CHECK(r[i].n > 0 && r[i].n == r[0].n && memcmp(r[i].tokens, r[0].tokens, (size_t)r[0].n * sizeof(int32_t)) == 0,
              "request %d answers as the first (%d tokens)", i, r[i].n);
        serve_release(r[i].handle);
    }
    g_image_label = 0;
    ServeStats s;
    serve_stats(e, &s);
    CHECK(s.vision_cache_misses == 3 && s.vision_cache_hits == 1 && s.vision_cache_entries == 1 &&
              s.vision_cache_bytes == cfg.vision_cache_bytes,
          "vision cache: %llu misses, %llu hits, %d entries, %llu bytes", (unsigned long long)s.vision_cache_misses,
          (unsigned long long)s.vision_cache_hits, s.vision_cache_entries, (unsigned long long)s.vision_cache_bytes);
    serve_free(e);
}

/* Twelve requests (text and image, base and adapters, greedy and sampled
 * with seeds) into 6 slots over a pool of just the blocks the longest one
 * needs: sequences are preempted when the pool runs dry and recompute their
 * KV on resuming; every answer must equal, token for token, the same
 * request on a pool with room for all, and every block (both spaces) must
 * come back. */
/* A job that trained on the served base hands its adapter over as it is:
 * bound by another context on m's weights (the trainer's), whose parameter
 * slab the engine binds without a copy after that context has closed. Its
 * answers, text and image, equal the same adapter's bound to ref; no
 * directory exists to load it from. */
static void test_handover(Model *m, Model *ref, const Prompt1 *prompts, const SafeTensors *img) {
    GfError err;
    rs = 4242;
    LoraAdapter *theirs = random_adapter(m, "all-linear", 4);
    rs = 4242;
    LoraAdapter *mine = random_adapter(ref, "all-linear", 4);
    LoraBinding ref_b, tb;
    CHECK_STATUS(lora_bind(ref, mine, &ref_b, &err), GF_OK, err);
    KnBuffer slab = {0};
    Model *tm = NULL;
    ModelOptions tmo = {.n_threads = 1};
    CHECK_STATUS(model_new(model_weights(m), &tmo, &tm, &err), GF_OK, err);
    if (tm && lora_bind(tm, theirs, &tb, &err) == GF_OK) {
        slab = tb.d_params;
        memset(&tb.d_params, 0, sizeof tb.d_params);
        lora_binding_free(&tb);
    }
    model_close(tm);
    ServeConfig cfg;
    serve_config_default(&cfg, m);
    cfg.max_seqs = 2;
    ServeEngine *e = NULL;
    CHECK_STATUS(serve_start(m, &cfg, &e, &err), GF_OK, err);
    if (!e) return;
    serve_adapter_put(e, "trained", theirs, &slab);
    CHECK(!slab.data, "the engine took the slab");
    ServeStats st = {0};
    for (int i = 0; i < 60000 && !st.adapters_adopted; i++) { /* the engine thread binds it: wait, generously */
        serve_stats(e, &st);
        if (!st.adapters_adopted) usleep(1000);
    }
    int all_equal = 1;
    for (int q = 0; q < 4; q++) { /* prompts 0..3: text and image */
        Result res;
        CHECK_STATUS(submit(e, &prompts[q], img, "trained", NULL, 0.0f, 0, &res, &err), GF_OK, err);
        wait_done(&res);
        int32_t want[MAX_NEW + 1];
        int64_t nw = 0;
        alone(ref, &prompts[q], img, &ref_b, want, &nw);
        all_equal &= res.n == nw && memcmp(res.tokens, want, (size_t)nw * sizeof *want) == 0 && !res.error_code[0];
        serve_release(res.handle);
    }
    CHECK(all_equal, "the handed-over adapter answers as the same adapter uploaded anew");
    serve_stats(e, &st);
    CHECK(st.adapters_adopted == 1 && st.adapter_loads == 0 && st.adapter_uploads_staged == 0 &&
              st.adapter_uploads_engine == 0,
          "bound from its slab without a copy, a load or an upload (%llu, %llu, %llu, %llu)",
          (unsigned long long)st.adapters_adopted, (unsigned long long)st.adapter_loads,
          (unsigned long long)st.adapter_uploads_staged, (unsigned long long)st.adapter_uploads_engine);
    serve_stop(e);
    serve_free(e);
    lora_binding_free(&ref_b);
    lora_free(mine);
}

static void test_preemption(Model *m, const Prompt1 *prompts, const SafeTensors *img, const char *const *names,
                            char (*dirs)[600]) {
    enum { N = 12 };
    GfError err;
    ServeConfig roomy, tight;
    serve_config_default(&roomy, m);
    tight = roomy;
    tight.max_seqs = 6;
    tight.kv_block_len = 4;
    tight.kv_blocks = 0;
    g_max_new = 48;
    for (int q = 0; q < N; q++) {
        int64_t b = (prompts[q].n + g_max_new + tight.kv_block_len - 1) / tight.kv_block_len;
        if (b > tight.kv_blocks) tight.kv_blocks = b;
    }
    tight.max_context = tight.kv_blocks * tight.kv_block_len;
    Result want[N], got[N];
    ServeStats st[2];
    for (int pass = 0; pass < 2; pass++) {
        ServeEngine *e = NULL;
        CHECK_STATUS(serve_start(m, pass ? &tight : &roomy, &e, &err), GF_OK, err);
        if (!e) return;
        Result *r = pass ? got : want;
        for (int q = 0; q < N; q++) {
            int a = q % 3 - 1;
            CHECK_STATUS(submit(e, &prompts[q], img, a < 0 ? NULL : names[a], a < 0 ? NULL : dirs[a], q % 2 ? 1.0f : 0.0f,
                                (uint64_t)(100 + q), &r[q], &err), GF_OK, err);
        }
        for (int q = 0; q < N; q++) {
            wait_done(&r[q]);
            serve_release(r[q].handle);
        }
        usleep(50 * 1000);
        serve_stats(e, &st[pass]);
        serve_free(e);
    }
    g_max_new = MAX_NEW;
    int same = 1;
    for (int q = 0; q < N; q++) {
        int eq = got[q].n == want[q].n && got[q].n > 0 && !got[q].error_code[0] && got[q].finish == want[q].finish &&
                 memcmp(got[q].tokens, want[q].tokens, (size_t)got[q].n * sizeof(int32_t)) == 0;
        if (!eq) printf("preemption: request %d gave %d tokens (error '%s') vs %d\n", q, got[q].n, got[q].error_code, want[q].n);
        same &= eq;
    }
    printf("preemption: %lld blocks of %lld positions, %llu preemptions (roomy pool: %llu)\n", (long long)tight.kv_blocks,
           (long long)tight.kv_block_len, (unsigned long long)st[1].preemptions, (unsigned long long)st[0].preemptions);
    CHECK(st[1].preemptions > 0 && st[0].preemptions == 0, "the tight pool preempted (%llu), the roomy one did not",
          (unsigned long long)st[1].preemptions);
    CHECK(same, "every preempted and resumed answer equals the roomy pool's");
    CHECK(st[1].kv_blocks_used == 0 && st[1].kv_window_blocks_used == 0 && st[1].paused == 0 && st[1].kv_window_blocks_total > 0,
          "every block of both spaces back (%lld, %lld of %lld window blocks)", (long long)st[1].kv_blocks_used,
          (long long)st[1].kv_window_blocks_used, (long long)st[1].kv_window_blocks_total);
}

/* Decode steps went through graphs exactly where the backend records
 * (guarded, and CUDA unless GF_CUDA_GRAPHS=0): an unchanged batch replays
 * (on CUDA unless GF_CUDA_GRAPHS=record), under GF_GUARDED_GRAPH_FAIL steps
 * are resubmitted and no replay ever runs; on the CPU none. */
static void check_graph_steps(ServeEngine *e) {
    ServeStats st;
    serve_stats(e, &st);
    const char *dev = getenv("GF_DEVICE"), *graphs = getenv("GF_CUDA_GRAPHS"), *fail = getenv("GF_GUARDED_GRAPH_FAIL");
    int guarded = dev && strcmp(dev, "guarded") == 0;
    int cuda = dev && strncmp(dev, "cuda", 4) == 0 && !(graphs && strcmp(graphs, "0") == 0);
    uint64_t steps = st.graph_recorded + st.graph_replayed + st.graph_resubmitted;
    printf("decode steps through graphs: %llu recorded, %llu replayed, %llu resubmitted\n",
           (unsigned long long)st.graph_recorded, (unsigned long long)st.graph_replayed,
           (unsigned long long)st.graph_resubmitted);
    CHECK(guarded || cuda ? steps > 0 : steps == 0,
          "decode steps through graphs where the backend records: %llu recorded, %llu replayed, %llu resubmitted",
          (unsigned long long)st.graph_recorded, (unsigned long long)st.graph_replayed,
          (unsigned long long)st.graph_resubmitted);
    if (guarded && fail && atoi(fail) > 0)
        CHECK(st.graph_resubmitted > 0 && st.graph_replayed == 0, "guarded, failing graphs: resubmitted, never replayed");
    else if (guarded || (cuda && !(graphs && strcmp(graphs, "record") == 0)))
        CHECK(st.graph_replayed > 0, "%s: an unchanged batch replays its graph", dev);
}

int main(void) {
    const char *dir = GF_FIXTURES "/dense";
    char final_dir[600], path[600];
    snprintf(final_dir, sizeof final_dir, "%s/lora_lm/adapter_final", dir);
    snprintf(path, sizeof path, "%s/forward_image.safetensors", dir);
    GfError err;
    Model *m = NULL, *ref = NULL;
    ModelOptions mo = {.n_threads = 2, .quantize = MODEL_QUANT_NONE};
    CHECK_STATUS(model_open(dir, &mo, &m, &err), GF_OK, err);
    CHECK_STATUS(model_open(dir, &mo, &ref, &err), GF_OK, err);
    SafeTensors img;
    CHECK_STATUS(safetensors_open(path, "forward_image", &img, &err), GF_OK, err);
    if (!m || !ref) return check_done("test_serve");
    /* the adapters: three random ones, saved (so an evicted one can load
     * again) and handed over in memory; the golden adapter_final loads from
     * its directory on first use. Each is also bound to the reference model. */
    const char *names[4] = {"a-q", "a-all", "a-down", "a-final"};
    const char *targets[3] = {"q_proj", "all-linear", "down_proj"};
    char dirs[4][600];
    LoraAdapter *mine[4], *theirs[3];
    LoraBinding bind[4];
    for (int i = 0; i < 3; i++) {
        rs = 1000 + (uint64_t)i;
        mine[i] = random_adapter(ref, targets[i], 4);
        rs = 1000 + (uint64_t)i;
        theirs[i] = random_adapter(m, targets[i], 4);
        CHECK_STATUS(lora_bind(ref, mine[i], &bind[i], &err), GF_OK, err);
        snprintf(dirs[i], sizeof dirs[i], "/tmp/gf_test_serve_%d_%d", (int)getpid(), i);
        mkdir(dirs[i], 0700);
        CHECK_STATUS(lora_save_dir(mine[i], dirs[i], &err), GF_OK, err);
    }
    snprintf(dirs[3], sizeof dirs[3], "%s", final_dir);
    CHECK_STATUS(lora_load_dir(final_dir, ref, LORA_MAX_RANK, &mine[3], &err), GF_OK, err);
    CHECK_STATUS(lora_bind(ref, mine[3], &bind[3], &err), GF_OK, err);

    ServeConfig cfg;
    serve_config_default(&cfg, m);
    cfg.max_seqs = 6;
    cfg.max_queue = N_REQ;
    cfg.kv_block_len = 8;
    cfg.kv_blocks = 6 * 16;
    cfg.max_adapters = 2;  /* fewer than in use: LRU eviction and reloads happen */
    ServeEngine *e = NULL;
    CHECK_STATUS(serve_start(m, &cfg, &e, &err), GF_OK, err);
    if (!e) return check_done("test_serve");
    for (int i = 0; i < 3; i++) serve_adapter_put(e, names[i], theirs[i], NULL);

    Prompt1 prompts[N_REQ];
    Result res[N_REQ];
    int which[N_REQ];
    for (int q = 0; q < N_REQ; q++) {
        make_prompt(&prompts[q], q, &img);
        which[q] = q % 5 - 1; /* -1 = base */
        const char *name = which[q] < 0 ? NULL : names[which[q]];
        CHECK_STATUS(submit(e, &prompts[q], &img, name, which[q] < 0 ? NULL : dirs[which[q]], 0.0f, 0, &res[q], &err),
                     GF_OK, err);
    }
    int all_equal = 1;
    for (int q = 0; q < N_REQ; q++) {
        wait_done(&res[q]);
        int32_t want[MAX_NEW + 1];
        int64_t nw = 0;
        alone(ref, &prompts[q], &img, which[q] < 0 ? NULL : &bind[which[q]], want, &nw);
        int same = res[q].n == nw && memcmp(res[q].tokens, want, (size_t)nw * sizeof *want) == 0 && !res[q].error_code[0];
        if (!same)
            printf("request %d (adapter %d, %s): %d tokens vs %lld alone, error '%s'\n", q, which[q],
                   prompts[q].image ? "image" : "text", res[q].n, (long long)nw, res[q].error_code);
        all_equal &= same;
        serve_release(res[q].handle);
    }
    CHECK(all_equal, "every batched greedy answer equals its prompt generated alone");
    check_graph_steps(e);

    /* the same seed at temperature 1 in two different batches */
    Result s1, s2, other;
    CHECK_STATUS(submit(e, &prompts[1], &img, names[1], dirs[1], 1.0f, 77, &s1, &err), GF_OK, err);
    CHECK_STATUS(submit(e, &prompts[4], &img, NULL, NULL, 1.0f, 5, &other, &err), GF_OK, err);
    wait_done(&s1);
    CHECK_STATUS(submit(e, &prompts[1], &img, names[1], dirs[1], 1.0f, 77, &s2, &err), GF_OK, err);
    wait_done(&s2);
    wait_done(&other);
    CHECK(s1.n == s2.n && s1.n > 0 && memcmp(s1.tokens, s2.tokens, (size_t)s1.n * sizeof(int32_t)) == 0,
          "same seed, same sampled tokens (%d and %d tokens)", s1.n, s2.n);
    serve_release(s1.handle); serve_release(s2.handle); serve_release(other.handle);

    /* cancel after two tokens */
    Result c;
    c.cancel_after = 0;
    CHECK_STATUS(submit(e, &prompts[0], &img, NULL, NULL, 0.0f, 0, &c, &err), GF_OK, err);
    pthread_mutex_lock(&c.mu);
    c.cancel_after = 2;
    pthread_mutex_unlock(&c.mu);
    wait_done(&c);
    CHECK(c.finish == FINISH_CANCELLED || c.n == MAX_NEW, "cancelled request ends cancelled (finish %d, %d tokens)",
          (int)c.finish, c.n);
    serve_release(c.handle);

    /* an adapter directory that does not hold an adapter is refused by
     * serve_submit itself, on this thread (the engine thread never reads
     * adapters), and fails that request only */
    Result bad, good;
    ServeStats before;
    serve_stats(e, &before);
    GfStatus bst = submit(e, &prompts[0], &img, "broken", GF_FIXTURES "/dense", 0.0f, 0, &bad, &err);
    CHECK(bst != GF_OK && err.code[0] && !bad.handle, "broken adapter refused at submit (%s: %s)", err.code, err.message);
    CHECK_STATUS(submit(e, &prompts[0], &img, NULL, NULL, 0.0f, 0, &good, &err), GF_OK, err);
    wait_done(&good);
    CHECK(!good.error_code[0] && good.n > 0, "the next request is served");
    serve_release(good.handle);
    ServeStats after;
    serve_stats(e, &after);
    CHECK(after.failed == before.failed && after.requests == before.requests + 1, "the refused request never queued");

    /* prompt + max_tokens over the pool */
    Prompt1 big;
    make_prompt(&big, 0, &img);
    ServeSubmit s = {.n = big.n, .max_tokens = 100000, .sink = sink};
    s.ids = malloc((size_t)big.n * sizeof *s.ids);
    memcpy(s.ids, big.ids, (size_t)big.n * sizeof *s.ids);
    ServeReq *h = NULL;
    GfStatus st = serve_submit(e, &s, &h, &err);
    CHECK(st == GF_INVALID && strcmp(err.code, "context_length_exceeded") == 0 && strstr(err.message, "100000"),
          "too long: %s", err.message);

    ServeStats stats;
    usleep(100 * 1000);
    serve_stats(e, &stats);
    printf("served %llu requests (%llu completed, %llu failed, %llu cancelled), %llu tokens; adapter loads %llu, "
           "evictions %llu; KV blocks in use %lld\n", (unsigned long long)stats.requests,
           (unsigned long long)stats.completed, (unsigned long long)stats.failed, (unsigned long long)stats.cancelled,
           (unsigned long long)stats.generated_tokens, (unsigned long long)stats.adapter_loads,
           (unsigned long long)stats.adapter_evictions, (long long)stats.kv_blocks_used);
    CHECK(stats.kv_blocks_used == 0, "every KV block back in the pool");
    CHECK(stats.adapter_evictions > 0 && stats.adapter_loads > 0, "LRU evicted and reloaded adapters");
    CHECK(stats.adapter_uploads_engine == 0 && stats.adapter_uploads_staged >= 3 &&
              stats.adapter_uploads_staged <= stats.adapter_loads + 3,
          "every adapter was uploaded off the engine thread (%llu staged, %llu on the engine thread)",
          (unsigned long long)stats.adapter_uploads_staged, (unsigned long long)stats.adapter_uploads_engine);
    serve_free(e);
    test_preemption(m, prompts, &img, names, dirs);
    test_handover(m, ref, prompts, &img);
    for (int q = 0; q < N_REQ; q++)
        if (!prompts[q].image) {
            test_cancelled_leave_queue(m, &prompts[q]);
            break;
        }
    for (int q = 0; q < N_REQ; q++)
        if (prompts[q].image) {
            test_vision_cache_lru(m, &prompts[q], &img);
            break;
        }
    for (int i = 0; i < 4; i++) { lora_binding_free(&bind[i]); lora_free(mine[i]); }
    for (int i = 0; i < 3; i++) {
        char f[3000];
        snprintf(f, sizeof f, "%s/adapter_config.json", dirs[i]);
        unlink(f);
        snprintf(f, sizeof f, "%s/adapter_model.safetensors", dirs[i]);
        unlink(f);
        rmdir(dirs[i]);
    }
    safetensors_close(&img);
    model_close(m);
    model_close(ref);
    return check_done("test_serve");
}
