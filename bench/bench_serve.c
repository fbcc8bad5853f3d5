/* bench_serve.c - multi-adapter serving throughput of the serving engine (a
 * benchmark, not a test): N concurrent requests decoded in one continuous
 * batch, over the base model alone and over 1, 4, 16 and 64 distinct
 * adapters (rank 16 on q/k/v/o/gate/up/down, random B). Reports generated
 * tokens/s (prefill included in the wall time), the mean time to first
 * token, the time per output token and the bytes each decode step must read
 * (the base's weights and every distinct adapter once).
 * Then decode latency (p50 / p99 of the gaps between a request's tokens)
 * with and without a training job on the same device (a thread running
 * LoRA forward and backward passes on the same weights), through the device
 * scheduler (devsched.h) and without it, and the job's tokens/s each time.
 *
 * usage: bench_serve [--device cpu|cuda[:N]|guarded] [--precision fp32|bf16] [--threads N] [--requests N]
 *                    [--prompt T] [--tokens N] [--tiny DIR] [--shape e2b|e4b|31b[:LAYERS]] [--quantize nf4]
 *                    [--train-tokens T] [--decode-wait-ms N] [--kv-cache fp32|bf16]
 * Without --tiny it writes a random 120M Gemma 4 config (as bench_forward),
 * or with --shape a random checkpoint of that real shape (shapes_model.h).
 * On --device, else the device GF_DEVICE names, else the default one; at
 * --precision, else the device's default; the KV cache as --kv-cache says,
 * else serving's default (serve.h).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backward.h"
#include "devsched.h"
#include "lora.h"
#include "model.h"
#include "random_model.h"
#include "serve.h"
#include "shapes_model.h"

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int pending;
    double t_first_sum, t_submit;
    int n_first;
} Tally;

typedef struct {
    Tally *t;
    int got_first;
    double last;              /* when its last token came */
    double *gaps;             /* with gap_cap: where the gaps between tokens go (shared by a round) */
    int *n_gaps, gap_cap;
} One;

static int sink(void *cls, const ServeEvent *ev) {
    One *o = cls;
    Tally *t = o->t;
    double now = gf_time_mono();
    pthread_mutex_lock(&t->mu);
    if (ev->kind == SERVE_TOKEN && o->got_first && o->gaps && *o->n_gaps < o->gap_cap)
        o->gaps[(*o->n_gaps)++] = now - o->last;
    if (ev->kind == SERVE_TOKEN) o->last = now;
    if (ev->kind == SERVE_TOKEN && !o->got_first) {
        o->got_first = 1;
        t->t_first_sum += now - t->t_submit;
        t->n_first++;
    }
    if (ev->kind == SERVE_END && --t->pending == 0) pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

static LoraAdapter *random_adapter(Model *m, int rank, uint64_t seed) {
    const char *targets[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    LoraAdapter *a = NULL;
    GfError err;
    if (lora_create(m, targets, 7, rank, 2.0 * rank, 0, seed, &a, &err)) { fprintf(stderr, "%s\n", err.message); return NULL; }
    uint64_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < a->n_pairs; i++)
        for (int64_t j = 0; j < a->pairs[i].out * a->pairs[i].rank; j++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            a->pairs[i].B[j] = ((float)((s >> 40) & 0xFFFF) / 65536.0f - 0.5f) * 0.02f;
        }
    return a;
}

/* One round: n_req requests spread over n_adapters adapters (0 = base);
 * with gaps, the time between each request's tokens goes there (up to cap,
 * counted in *n_gaps). *wall and *ttft (may be NULL) get the round's wall
 * time and mean time to first token. */
static void round_gaps(ServeEngine *e, const Model *m, int n_req, int n_adapters, int prompt, int tokens, double *gaps,
                       int *n_gaps, int cap, double *wall_out, double *ttft_out) {
    Tally t = {.pending = n_req};
    pthread_mutex_init(&t.mu, NULL);
    pthread_cond_init(&t.cv, NULL);
    One *ones = calloc((size_t)n_req, sizeof *ones);
    ServeReq **handles = calloc((size_t)n_req, sizeof *handles);
    int V = model_config(m)->text.vocab_size;
    t.t_submit = gf_time_mono();
    for (int r = 0; r < n_req; r++) {
        ones[r] = (One){.t = &t, .gaps = gaps, .n_gaps = n_gaps, .gap_cap = cap};
        ServeSubmit s = {.n = prompt, .max_tokens = tokens, .sample = {0.0f, 1.0f, 0}, .sink = sink, .sink_cls = &ones[r]};
        s.ids = malloc((size_t)prompt * sizeof *s.ids);
        for (int i = 0; i < prompt; i++) s.ids[i] = 3 + (r * 131 + i * 7919) % (V - 3);
        if (n_adapters) snprintf(s.adapter, sizeof s.adapter, "bench-%d", r % n_adapters);
        GfError err;
        if (serve_submit(e, &s, &handles[r], &err)) {
            fprintf(stderr, "submit: %s\n", err.message);
            pthread_mutex_lock(&t.mu);
            t.pending--;
            pthread_mutex_unlock(&t.mu);
        }
    }
    pthread_mutex_lock(&t.mu);
    while (t.pending) pthread_cond_wait(&t.cv, &t.mu);
    pthread_mutex_unlock(&t.mu);
    double wall = gf_time_mono() - t.t_submit;
    for (int r = 0; r < n_req; r++) serve_release(handles[r]);
    free(handles);
    free(ones);
    if (wall_out) *wall_out = wall;
    if (ttft_out) *ttft_out = t.n_first ? t.t_first_sum / t.n_first : 0.0;
}

static double percentile(double *v, int n, double q);

/* A round, printed: generated tokens/s, mean time to first token, the time
 * per output token (p50, p99 of the gaps), the bytes a decode step must
 * read (the base's, and every distinct adapter's once), and how the
 * round's decode steps ran (graphs recorded, replayed, resubmitted; steps
 * padded to their bucket). */
static void round_(ServeEngine *e, const Model *m, int n_req, int n_adapters, int prompt, int tokens,
                   double adapter_bytes) {
    int cap = n_req * tokens, n_gaps = 0;
    double *gaps = malloc((size_t)(cap ? cap : 1) * sizeof *gaps), wall = 0, ttft = 0;
    ServeStats s0, s1;
    serve_stats(e, &s0);
    round_gaps(e, m, n_req, n_adapters, prompt, tokens, gaps, &n_gaps, cap, &wall, &ttft);
    serve_stats(e, &s1);
    double p50 = percentile(gaps, n_gaps, 0.5), p99 = percentile(gaps, n_gaps, 0.99);
    char label[32];
    snprintf(label, sizeof label, n_adapters ? "%d adapter%s" : "base only", n_adapters, n_adapters == 1 ? "" : "s");
    printf("%-12s %3d requests x %3d tokens: %8.1f generated tok/s | wall %6.2f s | mean TTFT %7.1f ms | TPOT p50 %7.1f "
           "p99 %7.1f ms | step reads %8.1f MB | graphs %llu recorded, %llu replayed, %llu resubmitted, %llu padded\n",
           label, n_req, tokens, (double)n_req * tokens / wall, wall, 1000.0 * ttft, 1000.0 * p50, 1000.0 * p99,
           (step_weight_bytes(m) + (n_adapters < n_req ? n_adapters : n_req) * adapter_bytes) / 1e6,
           (unsigned long long)(s1.graph_recorded - s0.graph_recorded),
           (unsigned long long)(s1.graph_replayed - s0.graph_replayed),
           (unsigned long long)(s1.graph_resubmitted - s0.graph_resubmitted),
           (unsigned long long)(s1.graph_padded - s0.graph_padded));
    free(gaps);
}

/* ---- a training job beside serving ------------------------------------------------ */

typedef struct {
    Model *m;                 /* the job's context on the served weights */
    DevSched *sched;          /* NULL: no scheduler, the two share the cores as the OS likes */
    int tokens;
    atomic_int stop;
    atomic_llong trained;     /* tokens through forward and backward */
    double seconds;
    double first_step_s;      /* the first sequence's forward and backward (kernels loaded, shapes planned) */
    const char *error;
} TrainJob;

static void *train_main(void *arg) {
    TrainJob *j = arg;
    LoraAdapter *a = NULL;
    LoraBinding b = {0};
    GradWorkspace *w = NULL;
    GfError err;
    const char *all[] = {"all-linear"};
    int V = model_config(j->m)->text.vocab_size;
    int32_t *ids = malloc((size_t)j->tokens * sizeof *ids);
    for (int i = 0; i < j->tokens; i++) ids[i] = 3 + (i * 7919) % (V - 3);
    TrainSequence seq = {.ids = ids, .labels = ids, .n = j->tokens};
    if (lora_create(j->m, all, 1, 16, 32.0, 0, 1, &a, &err) || lora_bind(j->m, a, &b, &err) || lora_binding_grads(&b, &err) ||
        grad_workspace_new(j->m, j->tokens, 16, &w, &err)) {
        j->error = "cannot set up training";
        atomic_store(&j->stop, 1);
    }
    model_set_yield(j->m, j->sched ? devsched_yield_hook : NULL, j->sched);
    double t0 = gf_time_mono(), loss;
    int64_t n;
    while (!atomic_load(&j->stop)) {
        double t1 = gf_time_mono();
        if (j->sched) devsched_train_enter(j->sched);
        GfStatus st = model_backward(j->m, w, &b, &seq, 1.0f, &loss, &n, &err);
        if (j->sched) devsched_train_leave(j->sched);
        if (st) { j->error = "training failed"; break; }
        if (atomic_load(&j->trained) == 0) j->first_step_s = gf_time_mono() - t1;
        atomic_fetch_add(&j->trained, j->tokens);
    }
    if (j->error) atomic_store(&j->stop, 1);
    j->seconds = gf_time_mono() - t0;
    model_set_yield(j->m, NULL, NULL);
    grad_workspace_free(w);
    lora_binding_free(&b);
    lora_free(a);
    free(ids);
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double percentile(double *v, int n, double q) {
    if (n == 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int i = (int)(q * (n - 1) + 0.5);
    return v[i];
}

/* Decode rounds over the base with a training job beside them (mode 0:
 * none, 1: through sched, 2: without a scheduler), and a training job
 * alone; prints p50 / p99 time per output token and the job's tokens/s. */
/* Serving's defaults for m, the KV cache holding kv (KN_F32 or KN_BF16;
 * anything else: the default). */
static int bench_config(ServeConfig *cfg, Model *m, int kv) {
    GfError err;
    serve_config_default(cfg, m);
    if ((kv == KN_F32 || kv == KN_BF16) && serve_config_kv_dtype(cfg, m, (KnDtype)kv, &err)) {
        fprintf(stderr, "--kv-cache: %s\n", err.message);
        return -1;
    }
    return 0;
}

static void bench_training(Model *m, const ModelOptions *served, int kv, int n_req, int prompt, int tokens,
                           int train_tokens, double wait_s) {
    GfError err;
    DevSched *sched = devsched_new(wait_s, NULL, &err);
    Model *tm = NULL;
    ModelOptions mo = {.n_threads = served->n_threads, .quantize = MODEL_QUANT_NONE, .device = served->device,
                       .precision = served->precision}; /* the served model's device: one copy of the weights */
    if (!sched || model_new(model_weights(m), &mo, &tm, &err)) { fprintf(stderr, "%s\n", err.message); return; }
    printf("\ndecode beside a training job on the same device (LoRA all-linear rank 16, %d-token sequences, forward and "
           "backward on the served weights): %d requests x %d tokens, base model\n", train_tokens, n_req, tokens);
    static const char *const modes[] = {"serving alone", "with training, scheduled", "with training, unscheduled"};
    int cap = n_req * tokens;
    double *gaps = malloc((size_t)cap * sizeof *gaps);
    for (int mode = 0; mode < 3; mode++) {
        ServeConfig cfg;
        if (bench_config(&cfg, m, kv)) break;
        cfg.max_seqs = cfg.max_queue = n_req;
        cfg.max_context = prompt + tokens;
        cfg.kv_blocks = n_req * ((cfg.max_context + cfg.kv_block_len - 1) / cfg.kv_block_len);
        cfg.sched = mode == 1 ? sched : NULL;
        ServeEngine *e = NULL;
        if (serve_start(m, &cfg, &e, &err)) { fprintf(stderr, "%s\n", err.message); break; }
        round_gaps(e, m, n_req, 0, prompt, tokens, NULL, NULL, 0, NULL, NULL); /* warm-up */
        TrainJob job = {.m = tm, .sched = mode == 1 ? sched : NULL, .tokens = train_tokens};
        atomic_init(&job.stop, 0);
        pthread_t th;
        atomic_init(&job.trained, 0);
        if (mode) pthread_create(&th, NULL, train_main, &job);
        /* the job is under way: its first step (the first use of its kernels and shapes) is done */
        while (mode && atomic_load(&job.trained) == 0 && !atomic_load(&job.stop)) usleep(1000);
        int n_gaps = 0;
        round_gaps(e, m, n_req, 0, prompt, tokens, gaps, &n_gaps, cap, NULL, NULL);
        if (mode) {
            atomic_store(&job.stop, 1);
            pthread_join(th, NULL);
        }
        double p50 = percentile(gaps, n_gaps, 0.5), p99 = percentile(gaps, n_gaps, 0.99);
        printf("%-28s TPOT p50 %8.1f ms  p99 %8.1f ms", modes[mode], 1e3 * p50, 1e3 * p99);
        if (mode) printf(" | training %8.1f tok/s, first step %.1f ms%s%s",
                         job.seconds > 0 ? (double)atomic_load(&job.trained) / job.seconds : 0.0, 1e3 * job.first_step_s,
                         job.error ? ": " : "", job.error ? job.error : "");
        printf("\n");
        serve_free(e);
    }
    TrainJob alone = {.m = tm, .tokens = train_tokens};
    atomic_init(&alone.stop, 0);
    atomic_init(&alone.trained, 0);
    pthread_t th;
    pthread_create(&th, NULL, train_main, &alone);
    sleep(3);
    atomic_store(&alone.stop, 1);
    pthread_join(th, NULL);
    printf("%-28s %37s training %8.1f tok/s\n", "training alone", "",
           alone.seconds > 0 ? (double)atomic_load(&alone.trained) / alone.seconds : 0.0);
    DevSchedStats st;
    devsched_stats(sched, &st);
    printf("scheduler (bound %.0f ms): %llu of %llu steps waited, longest %.1f ms, %llu yields; training's longest "
           "stretch between layer boundaries %.1f ms, in its sequence %llu of %llu (the first ran before the timing)\n",
           1e3 * wait_s, (unsigned long long)st.serve_waits, (unsigned long long)st.serve_steps, 1e3 * st.serve_wait_max_s,
           (unsigned long long)st.train_yields, 1e3 * st.train_span_max_s, (unsigned long long)st.train_span_max_hold,
           (unsigned long long)(st.train_slices - st.train_yields));
    free(gaps);
    model_close(tm);
    devsched_free(sched);
}

int main(int argc, char **argv) {
    int threads = 0, requests = 64, prompt = 32, tokens = 16, train_tokens = 128, n_layers = 0, kv = -1;
    double wait_ms = 0;
    const char *tiny = NULL, *shape_arg = NULL, *device = NULL, *precision = NULL;
    ModelQuant quant = MODEL_QUANT_NONE;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--device") == 0) device = argv[++i];
        else if (strcmp(argv[i], "--precision") == 0) precision = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--requests") == 0) requests = atoi(argv[++i]);
        else if (strcmp(argv[i], "--prompt") == 0) prompt = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tokens") == 0) tokens = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tiny") == 0) tiny = argv[++i];
        else if (strcmp(argv[i], "--train-tokens") == 0) train_tokens = atoi(argv[++i]);
        else if (strcmp(argv[i], "--decode-wait-ms") == 0) wait_ms = atof(argv[++i]);
        else if (strcmp(argv[i], "--shape") == 0) shape_arg = argv[++i];
        else if (strcmp(argv[i], "--quantize") == 0) quant = strcmp(argv[++i], "nf4") == 0 ? MODEL_QUANT_NF4 : MODEL_QUANT_NONE;
        else if (strcmp(argv[i], "--kv-cache") == 0) kv = strcmp(argv[++i], "bf16") == 0 ? KN_BF16 : KN_F32;
    }
    gf_log_init(GF_LOG_WARN);
    const Shape *shape = NULL;
    char shape_name[16] = "";
    if (shape_arg) { /* NAME or NAME:LAYERS */
        snprintf(shape_name, sizeof shape_name, "%s", shape_arg);
        char *colon = strchr(shape_name, ':');
        if (colon) *colon = '\0';
        shape = shape_find(shape_name);
        n_layers = shape ? (colon ? atoi(colon + 1) : shape->layers) : 0;
        if (!shape || n_layers < 1 || n_layers > shape->layers) {
            fprintf(stderr, "--shape: e2b, e4b or 31b, optionally :LAYERS\n");
            return 2;
        }
    }
    char tmp[] = "/tmp/gf-bench-XXXXXX";
    const char *dir = tiny;
    if (!dir) {
        uint64_t bytes;
        if (!mkdtemp(tmp) || (shape ? shape_write(tmp, shape, n_layers, &bytes)
                                    : write_random_model(tmp, 1024, 6, 4096, 32768, 8, 2, 128, 256))) {
            fprintf(stderr, "cannot write the random model\n");
            return 1;
        }
        dir = tmp;
    }
    Model *m = NULL;
    GfError err;
    ModelOptions mo = {.n_threads = threads, .quantize = quant, .device = device, .precision = precision};
    if (model_open(dir, &mo, &m, &err)) { fprintf(stderr, "%s\n", err.message); return 1; }
    ServeConfig cfg;
    if (bench_config(&cfg, m, kv)) return 1;
    cfg.max_seqs = requests;
    cfg.max_queue = requests;
    cfg.max_context = prompt + tokens;
    cfg.kv_blocks = requests * ((cfg.max_context + cfg.kv_block_len - 1) / cfg.kv_block_len);
    cfg.max_adapters = 64;
    ServeEngine *e = NULL;
    if (serve_start(m, &cfg, &e, &err)) { fprintf(stderr, "%s\n", err.message); return 1; }
    const TextConfig *t = &model_config(m)->text;
    const KnBackend *be = model_backend(m);
    char label[64];
    snprintf(label, sizeof label, "%s%s", shape ? shape_name : tiny ? "tiny" : "random 120M", shape ? " (random)" : "");
    printf("serving engine on %s (%s, %s KV cache): %s model, %s, %d layers, hidden %d, vocab %d; %d sequences per batch, "
           "prompt %d, greedy; adapters rank 16 on q/k/v/o/gate/up/down\n", be->name, kn_precision_name(be->ctx.precision),
           cfg.kv_dtype == KN_BF16 ? "bf16" : "fp32", label, quant == MODEL_QUANT_NF4 ? "NF4" : "as stored", t->n_layers,
           t->hidden_size, t->vocab_size, requests, prompt);
    double adapter_bytes = 0;
    for (int i = 0; i < 64; i++) {
        char name[32];
        snprintf(name, sizeof name, "bench-%d", i);
        LoraAdapter *a = random_adapter(m, 16, (uint64_t)i + 1);
        if (a) adapter_bytes = (double)a->n_params * sizeof(float);
        if (a) serve_adapter_put(e, name, a, NULL);
    }
    round_(e, m, requests, 0, prompt, tokens, adapter_bytes); /* warm-up */
    round_(e, m, requests, 0, prompt, tokens, adapter_bytes);
    static const int counts[] = {1, 4, 16, 64};
    for (int k = 0; k < 4; k++) round_(e, m, requests, counts[k], prompt, tokens, adapter_bytes);
    serve_free(e);
    bench_training(m, &mo, kv, requests < 8 ? requests : 8, prompt, 4 * tokens, train_tokens, wait_ms / 1000.0);
    model_close(m);
    if (shape) {
        shape_remove(tmp);
    } else if (!tiny) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    }
    return 0;
}
