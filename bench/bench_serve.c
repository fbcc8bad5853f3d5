/* bench_serve.c - multi-adapter serving throughput of the serving engine (a
 * benchmark, not a test): N concurrent requests decoded in one continuous
 * batch, over the base model alone and over 1, 4, 16 and 64 distinct
 * adapters (rank 16 on q/k/v/o/gate/up/down, random B), on the CPU backend.
 * Reports generated tokens/s (prefill included in the wall time) and the
 * mean time to first token, so the CUDA backend can be measured against it.
 *
 * usage: bench_serve [--threads N] [--requests N] [--prompt T] [--tokens N] [--tiny DIR]
 * Without --tiny it writes a random 120M Gemma 4 config (as bench_forward).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lora.h"
#include "model.h"
#include "random_model.h"
#include "serve.h"

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
} One;

static int sink(void *cls, const ServeEvent *ev) {
    One *o = cls;
    Tally *t = o->t;
    pthread_mutex_lock(&t->mu);
    if (ev->kind == SERVE_TOKEN && !o->got_first) {
        o->got_first = 1;
        t->t_first_sum += gf_time_mono() - t->t_submit;
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

/* One round: n_req requests spread over n_adapters adapters (0 = base). */
static void round_(ServeEngine *e, const Model *m, int n_req, int n_adapters, int prompt, int tokens) {
    Tally t = {.pending = n_req};
    pthread_mutex_init(&t.mu, NULL);
    pthread_cond_init(&t.cv, NULL);
    One *ones = calloc((size_t)n_req, sizeof *ones);
    ServeReq **handles = calloc((size_t)n_req, sizeof *handles);
    int V = model_config(m)->text.vocab_size;
    t.t_submit = gf_time_mono();
    for (int r = 0; r < n_req; r++) {
        ones[r].t = &t;
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
    char label[32];
    snprintf(label, sizeof label, n_adapters ? "%d adapter%s" : "base only", n_adapters, n_adapters == 1 ? "" : "s");
    printf("%-12s %3d requests x %3d tokens: %8.1f generated tok/s | wall %6.2f s | mean TTFT %7.1f ms\n", label, n_req,
           tokens, (double)n_req * tokens / wall, wall,
           t.n_first ? 1000.0 * t.t_first_sum / t.n_first : 0.0);
    for (int r = 0; r < n_req; r++) serve_release(handles[r]);
    free(handles);
    free(ones);
}

int main(int argc, char **argv) {
    int threads = 0, requests = 64, prompt = 32, tokens = 16;
    const char *tiny = NULL;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--requests") == 0) requests = atoi(argv[++i]);
        else if (strcmp(argv[i], "--prompt") == 0) prompt = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tokens") == 0) tokens = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tiny") == 0) tiny = argv[++i];
    }
    gf_log_init(GF_LOG_WARN);
    char tmp[] = "/tmp/gf-bench-XXXXXX";
    const char *dir = tiny;
    if (!dir) {
        if (!mkdtemp(tmp) || write_random_model(tmp, 1024, 6, 4096, 32768, 8, 2, 128, 256)) {
            fprintf(stderr, "cannot write the random model\n");
            return 1;
        }
        dir = tmp;
    }
    Model *m = NULL;
    GfError err;
    ModelOptions mo = {.n_threads = threads, .quantize = MODEL_QUANT_NONE};
    if (model_open(dir, &mo, &m, &err)) { fprintf(stderr, "%s\n", err.message); return 1; }
    ServeConfig cfg;
    serve_config_default(&cfg, m);
    cfg.max_seqs = requests;
    cfg.max_queue = requests;
    cfg.max_context = prompt + tokens;
    cfg.kv_blocks = requests * ((cfg.max_context + cfg.kv_block_len - 1) / cfg.kv_block_len);
    cfg.max_adapters = 64;
    ServeEngine *e = NULL;
    if (serve_start(m, &cfg, &e, &err)) { fprintf(stderr, "%s\n", err.message); return 1; }
    const TextConfig *t = &model_config(m)->text;
    printf("serving engine, CPU backend: %s model, %d layers, hidden %d, vocab %d; %d sequences per batch, prompt %d, "
           "greedy; adapters rank 16 on q/k/v/o/gate/up/down\n", tiny ? "tiny" : "random 120M bf16", t->n_layers,
           t->hidden_size, t->vocab_size, requests, prompt);
    for (int i = 0; i < 64; i++) {
        char name[32];
        snprintf(name, sizeof name, "bench-%d", i);
        LoraAdapter *a = random_adapter(m, 16, (uint64_t)i + 1);
        if (a) serve_adapter_put(e, name, a);
    }
    round_(e, m, requests, 0, prompt, tokens); /* warm-up */
    round_(e, m, requests, 0, prompt, tokens);
    static const int counts[] = {1, 4, 16, 64};
    for (int k = 0; k < 4; k++) round_(e, m, requests, counts[k], prompt, tokens);
    serve_free(e);
    model_close(m);
    if (!tiny) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    }
    return 0;
}
