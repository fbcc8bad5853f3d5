/* main.c - the gemmaforge command line: `serve` starts the HTTP server; the
 * engine commands (forward, generate, preprocess, tokenize, infer, lora-step,
 * train, preflight) run the engine directly; merge writes an adapter merged
 * into its base. The only file that calls exit(). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_engine.h"
#include "cli_export.h"
#include "cli_inputs.h"
#include "cli_train.h"
#include "httpd.h"
#include "job_follow.h"
#include "exports.h"
#include "jobs.h"
#include "kernels.h"
#include "metrics.h"
#include "model.h"
#include "pipeline.h"
#include "serve.h"
#include "store_open.h"
#include "work_pool.h"

#define VERSION "0.1.0"

typedef struct {
    const char *model_dir;
    const char *data_dir;
    const char *model_name;
    HttpdConfig http;
    ApiLimits limits;
    int verbose;
    int train_threads;
    const char *device;           /* NULL = the default (model.h); serving and jobs alike */
    const char *precision;        /* NULL = the default (model.h); serving and jobs alike */
    uint64_t device_memory;       /* bytes jobs may count on the device, base copies included; 0 = what it has free */
    int no_train;
    int no_export;
    int max_seqs;                 /* 0 = default */
    int max_inference_queue;      /* -1 = default */
    int64_t max_context;          /* 0 = default: KV room per slot */
    int64_t kv_blocks;            /* 0 = default: every slot can reach max_context */
    const char *kv_cache;         /* "fp32" or "bf16"; NULL = the default (serve.h) */
    int max_resident_adapters;    /* -1 = default */
    int image_threads;            /* threads decoding requests' images */
    long long vision_cache_mb;    /* -1 = default */
    long long decode_wait_ms;     /* how long a serving step may wait for a training job before it gives way */
    int device_sched;             /* serving and training take turns on the device: -1 = on GPUs only, 0 off, 1 on */
    int max_image_tasks;          /* requests with images being decoded or waiting to be; 429 beyond */
    int64_t max_tokens;           /* 0 = default cap on max_tokens */
    ModelQuant quantize;          /* the served base: bf16 as stored, or NF4 (QLoRA) */
    unsigned drain_s;             /* on SIGTERM: seconds requests may take to finish */
    unsigned disk_full_wait_s;    /* a job blocked by a full disk waits this long, then pauses */
} ServeOptions;

static void usage(FILE *f) {
    fprintf(f,
            "usage: gemmaforge <command> [options]\n\n"
            "commands:\n"
            "  serve      run the HTTP API server\n"
            "  devices    list the compute devices this build can use\n"
            "  routes     print the REST route table (JSON lines)\n"
            "  version    print the version\n"
            "  forward    run the text model: --model DIR --inputs IN.safetensors --out OUT.safetensors [--hidden]\n"
            "  generate   greedy continuation: --model DIR --ids 2,17,... [--max-new N]\n"
            "  preprocess an image as the model sees it: --image F [--max-soft-tokens N] --out OUT.safetensors\n"
            "  tokenize   --model DIR [--add-special] TEXT, or --jsonl ({\"text\":..} lines on stdin)\n"
            "  infer      answer a question about images: --model DIR [--image F]... --prompt TEXT [--max-tokens N]\n"
            "  lora-step  gradient/optimizer parity: --model DIR --adapter DIR --inputs IN.safetensors --out DIR\n"
            "             [--steps N] [--lr X] [--weight-decay W]\n"
            "  train      fine-tune an adapter on a dataset: --model DIR --dataset FILE.jsonl [--images TAR] --out DIR\n"
            "             [hyperparameters as --learning-rate X ...; see `gemmaforge train` without options]\n"
            "  preflight  memory estimate, LoRA targets and a formatted dataset example: --model DIR [--dataset FILE.jsonl]\n"
            "             [train's hyperparameter flags]\n"
            "  merge      an adapter merged into its base, as a new model directory: --model DIR --adapter DIR\n"
            "             --out DIR [--dtype bf16|f16|f32] [--max-shard-bytes N]\n"
            "  export-gguf the text model (with an adapter merged in) for llama.cpp: --model DIR [--adapter DIR]\n"
            "             --out FILE [--type f16|bf16|f32|q8_0|q4_0]\n\n"
            "serve options:\n"
            "  --model DIR             Gemma 4 model directory (config.json + safetensors)\n"
            "  --model-name NAME       name the base model is served under (default: DIR's name)\n"
            "  --data DIR              data directory (default ./data)\n"
            "  --host ADDR             IPv4 address to bind (default 127.0.0.1)\n"
            "  --port N                port (default 8080; 0 picks a free one)\n"
            "  --api-key KEY           accept this API key (repeatable); also GF_API_KEYS=k1,k2\n"
            "  --api-key-file FILE     accept the keys in FILE, one per line\n"
            "  --allowed-host NAME     also answer to this Host header (repeatable)\n"
            "  --threads N             HTTP worker threads (default 4)\n"
            "  --device D              cpu, cuda or cuda:N, for serving and jobs (default: the first GPU, else the CPU;\n"
            "                          also GF_DEVICE)\n"
            "  --precision fp32|bf16   how the matmuls compute: bf16 operands on the tensor cores with fp32 sums\n"
            "                          (the default on CUDA) or fp32 throughout (the only one on the CPU; also\n"
            "                          GF_PRECISION)\n"
            "  --device-memory BYTES   memory the base copies and jobs may use on the device; a job that would not\n"
            "                          fit fails at its start, saying why (default: what the device has free)\n"
            "  --train-threads N       engine threads of the job worker (default 0: all cores)\n"
            "  --no-train              run no fine-tuning jobs here (they stay queued for a server that does)\n"
            "  --no-export             run no export jobs (merges) here (they stay queued for a server that does)\n"
            "  --max-connections N     (default 256)   --per-ip-connections N (default 64)\n"
            "  --timeout S             idle connection timeout in seconds (default 30)\n"
            "  --header-timeout S      a request head must be complete within S seconds (default 10; 0 = off)\n"
            "  --min-body-rate B       past that, an upload must average B bytes/s (default 1024; 0 = off)\n"
            "  --drain S               on SIGINT/SIGTERM, seconds running requests may take to finish\n"
            "                          before they end with 503 shutting_down (default 10)\n"
            "  --max-queued-jobs N     (default 100)   --min-examples N (default 10)\n"
            "  --disk-full-wait S      a job whose checkpoint finds the disk full waits S seconds for space,\n"
            "                          then pauses, saying why (default 600; 0 = pause at once)\n"
            "  --quantize nf4|none     serve the base quantized to NF4, as QLoRA trained it (default none: bf16)\n"
            "  --max-seqs N            sequences decoding at once (default 16)\n"
            "  --max-queue N           inference requests waiting for a slot; 429 beyond (default 64)\n"
            "  --max-context N         KV cache positions per sequence (default 8192, at most 64 MiB each)\n"
            "  --kv-cache fp32|bf16    what the KV cache holds (default bf16 in the bf16 precision, else fp32);\n"
            "                          bf16 halves a block: the 64 MiB per sequence holds twice the positions\n"
            "  --kv-blocks N           KV blocks of 16 positions for the full-attention layers (default: every\n"
            "                          sequence can reach --max-context; fewer: sequences are preempted and\n"
            "                          resumed when the pool runs dry)\n"
            "  --max-adapters N        adapters kept in memory when idle (default 8)\n"
            "  --max-tokens N          cap on a request's max_tokens (default 4096)\n"
            "  --image-threads N       threads decoding requests' images, off the HTTP threads (default 2)\n"
            "  --max-image-queue N     requests whose images are decoding or waiting to; 429 beyond (default 16)\n"
            "  --vision-cache-mb N     vision tower outputs kept for repeated images (default 128; 0 = none)\n"
            "  --device-sched on|off   serving steps and a training job take turns on the device, serving first\n"
            "                          (default: on a GPU; on the CPU the OS shares the cores more finely)\n"
            "  --decode-wait-ms N      a serving step finding a training job on the device lets it go on for up\n"
            "                          to N ms (plus one layer) before it gives way: more for training, slower\n"
            "                          decoding (default 0: the job gives way at its next layer)\n"
            "  --max-upload-bytes N    dataset and adapter upload cap (default 2 GiB)\n"
            "  --web DIR               dashboard files (default: the source tree's web/)\n"
            "  --verbose               debug logging\n");
}

/* ---- options ----------------------------------------------------------- */

static int add_key(HttpdConfig *h, const char *key) {
    size_t n = strlen(key);
    while (n && (key[n - 1] == '\n' || key[n - 1] == '\r')) n--;
    if (n == 0) return 0;
    if (n < 16) {
        fprintf(stderr, "gemmaforge: API keys must be at least 16 characters\n");
        return -1;
    }
    if (h->n_keys == HTTPD_MAX_KEYS) {
        fprintf(stderr, "gemmaforge: at most %d API keys\n", HTTPD_MAX_KEYS);
        return -1;
    }
    gf_sha256(key, n, h->key_digests[h->n_keys++]);
    return 0;
}

static int add_key_file(HttpdConfig *h, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "gemmaforge: cannot read --api-key-file: %s\n", strerror(errno));
        return -1;
    }
    char line[1024];
    int rc = 0;
    while (!rc && fgets(line, sizeof line, f))
        if (line[0] != '#') rc = add_key(h, line);
    fclose(f);
    return rc;
}

static int add_env_keys(HttpdConfig *h) {
    const char *env = getenv("GF_API_KEYS");
    if (!env || !*env) return 0;
    char *copy = strdup(env), *save = NULL;
    int rc = copy ? 0 : -1;
    for (char *k = copy ? strtok_r(copy, ",", &save) : NULL; k && !rc; k = strtok_r(NULL, ",", &save)) rc = add_key(h, k);
    free(copy);
    return rc;
}

static int parse_uint(const char *s, unsigned long long max, unsigned long long *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (!*s || *end || errno || v > max || s[0] == '-') return -1;
    *out = v;
    return 0;
}

static int parse_serve(int argc, char **argv, ServeOptions *o) {
    static char default_web[] = GF_WEB_DIR;
    memset(o, 0, sizeof *o);
    o->data_dir = "./data";
    o->http.bind_addr = "127.0.0.1";
    o->http.port = 8080;
    o->http.threads = 4;
    o->http.max_connections = 256;
    o->http.per_ip_connections = 64;
    o->http.timeout_s = 30;
    o->http.header_timeout_s = 10;
    o->http.min_body_rate = 1024;
    o->http.web_dir = default_web;
    api_limits_default(&o->limits);
    o->max_inference_queue = -1;
    o->max_resident_adapters = -1;
    o->image_threads = 2;
    o->vision_cache_mb = -1;
    o->decode_wait_ms = 0;
    o->device_sched = -1;
    o->max_image_tasks = 16;
    o->drain_s = 10;
    o->disk_full_wait_s = 600;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        unsigned long long n = 0;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return 1; /* usage on stdout, exit 0 */
        int takes = strcmp(a, "--verbose") != 0 && strcmp(a, "--no-train") != 0 && strcmp(a, "--no-export") != 0;
        if (takes && !v) { fprintf(stderr, "gemmaforge: %s needs a value\n", a); return -1; }
        if (strcmp(a, "--verbose") == 0) o->verbose = 1;
        else if (strcmp(a, "--no-train") == 0) o->no_train = 1;
        else if (strcmp(a, "--no-export") == 0) o->no_export = 1;
        else if (strcmp(a, "--model") == 0) o->model_dir = v;
        else if (strcmp(a, "--model-name") == 0) o->model_name = v;
        else if (strcmp(a, "--data") == 0) o->data_dir = v;
        else if (strcmp(a, "--host") == 0) o->http.bind_addr = v;
        else if (strcmp(a, "--web") == 0) o->http.web_dir = v;
        else if (strcmp(a, "--api-key") == 0) { if (add_key(&o->http, v)) return -1; }
        else if (strcmp(a, "--api-key-file") == 0) { if (add_key_file(&o->http, v)) return -1; }
        else if (strcmp(a, "--allowed-host") == 0) {
            if (o->http.n_allowed_hosts == HTTPD_MAX_HOSTS || strlen(v) >= 256) { fprintf(stderr, "gemmaforge: too many or too long --allowed-host\n"); return -1; }
            snprintf(o->http.allowed_hosts[o->http.n_allowed_hosts++], 256, "%s", v);
        }
        else if (strcmp(a, "--port") == 0 && !parse_uint(v, 65535, &n)) o->http.port = (uint16_t)n;
        else if (strcmp(a, "--threads") == 0 && !parse_uint(v, 256, &n) && n) o->http.threads = (unsigned)n;
        else if (strcmp(a, "--train-threads") == 0 && !parse_uint(v, 1024, &n)) o->train_threads = (int)n;
        else if (strcmp(a, "--device") == 0 && cli_parse_device(v) == 0) o->device = v;
        else if (strcmp(a, "--precision") == 0 && cli_parse_precision(v) == 0) o->precision = v;
        else if (strcmp(a, "--device-memory") == 0 && !parse_uint(v, 1ull << 50, &n) && n) o->device_memory = n;
        else if (strcmp(a, "--max-connections") == 0 && !parse_uint(v, 100000, &n) && n) o->http.max_connections = (unsigned)n;
        else if (strcmp(a, "--per-ip-connections") == 0 && !parse_uint(v, 100000, &n) && n) o->http.per_ip_connections = (unsigned)n;
        else if (strcmp(a, "--timeout") == 0 && !parse_uint(v, 3600, &n) && n) o->http.timeout_s = (unsigned)n;
        else if (strcmp(a, "--drain") == 0 && !parse_uint(v, 3600, &n)) o->drain_s = (unsigned)n;
        else if (strcmp(a, "--disk-full-wait") == 0 && !parse_uint(v, 7 * 86400, &n)) o->disk_full_wait_s = (unsigned)n;
        else if (strcmp(a, "--header-timeout") == 0 && !parse_uint(v, 3600, &n)) o->http.header_timeout_s = (unsigned)n;
        else if (strcmp(a, "--min-body-rate") == 0 && !parse_uint(v, 1u << 30, &n)) o->http.min_body_rate = (unsigned)n;
        else if (strcmp(a, "--quantize") == 0 && cli_parse_quantize(v, &o->quantize) == 0) {}
        else if (strcmp(a, "--max-seqs") == 0 && !parse_uint(v, 4096, &n) && n) o->max_seqs = (int)n;
        else if (strcmp(a, "--max-queue") == 0 && !parse_uint(v, 1000000, &n)) o->max_inference_queue = (int)n;
        else if (strcmp(a, "--max-context") == 0 && !parse_uint(v, 1 << 20, &n) && n) o->max_context = (int64_t)n;
        else if (strcmp(a, "--kv-blocks") == 0 && !parse_uint(v, INT32_MAX, &n) && n) o->kv_blocks = (int64_t)n;
        else if (strcmp(a, "--kv-cache") == 0 && (strcmp(v, "fp32") == 0 || strcmp(v, "bf16") == 0)) o->kv_cache = v;
        else if (strcmp(a, "--max-adapters") == 0 && !parse_uint(v, 100000, &n)) o->max_resident_adapters = (int)n;
        else if (strcmp(a, "--image-threads") == 0 && !parse_uint(v, 256, &n) && n) o->image_threads = (int)n;
        else if (strcmp(a, "--vision-cache-mb") == 0 && !parse_uint(v, 1u << 20, &n)) o->vision_cache_mb = (long long)n;
        else if (strcmp(a, "--decode-wait-ms") == 0 && !parse_uint(v, 60000, &n)) o->decode_wait_ms = (long long)n;
        else if (strcmp(a, "--device-sched") == 0 && (strcmp(v, "on") == 0 || strcmp(v, "off") == 0))
            o->device_sched = strcmp(v, "on") == 0;
        else if (strcmp(a, "--max-image-queue") == 0 && !parse_uint(v, 100000, &n) && n) o->max_image_tasks = (int)n;
        else if (strcmp(a, "--max-tokens") == 0 && !parse_uint(v, 1 << 20, &n) && n) o->max_tokens = (int64_t)n;
        else if (strcmp(a, "--max-queued-jobs") == 0 && !parse_uint(v, 1000000, &n)) o->limits.max_queued_jobs = (int)n;
        else if (strcmp(a, "--min-examples") == 0 && !parse_uint(v, 1000000, &n) && n) o->limits.dataset_min_examples = n;
        else if (strcmp(a, "--max-upload-bytes") == 0 && !parse_uint(v, 1ull << 40, &n) && n)
            o->limits.dataset_upload_max = o->limits.adapter_upload_max = n;
        else { fprintf(stderr, "gemmaforge: unknown option or bad value: %s %s\n", a, takes ? v : ""); return -1; }
        i += takes;
    }
    return add_env_keys(&o->http);
}

/* ---- serve ------------------------------------------------------------- */

/* Loads the base model (weights, tokenizer, chat template, image processor). */
static int open_model(const ServeOptions *o, WeightsGauge *gauge, Pipeline **pipe, ApiModel *m) {
    memset(m, 0, sizeof *m);
    *pipe = NULL;
    if (!o->model_dir) {
        snprintf(m->not_ready_reason, sizeof m->not_ready_reason, "no model directory was given (--model DIR)");
        return 0;
    }
    GfError err;
    ModelOptions mo = {.device = o->device, .precision = o->precision, .quantize = o->quantize, .gauge = gauge};
    if (pipeline_open(o->model_dir, &mo, pipe, &err)) {
        fprintf(stderr, "gemmaforge: cannot load the model: %s\n", err.message);
        return -1;
    }
    const ModelDir *md = model_dir((*pipe)->model);
    snprintf(m->id, sizeof m->id, "%s", o->model_name ? o->model_name : md->name);
    m->dir_ok = 1;
    m->loaded = 1;
    m->base_shapes = &md->base;
    GF_LOGI("model '%s': %zu weight file(s), %llu tensors, %.1f MB; %.1f MB of %s base weights resident", m->id,
            md->n_shards, (unsigned long long)md->n_tensors, (double)md->n_bytes / 1e6,
            (double)weights_resident_bytes(model_weights((*pipe)->model)) / 1e6,
            o->quantize == MODEL_QUANT_NF4 ? "NF4" : "full-precision");
    return 0;
}

/* The serving engine on the loaded model, and what the API needs of it. */
static int start_serving(const ServeOptions *o, Pipeline *pipe, DevSched *sched, Api *api, ServeEngine **out) {
    *out = NULL;
    if (!pipe) return 0;
    ServeConfig sc;
    GfError err;
    serve_config_default(&sc, pipe->model);
    if (o->kv_cache &&
        serve_config_kv_dtype(&sc, pipe->model, strcmp(o->kv_cache, "bf16") == 0 ? KN_BF16 : KN_F32, &err)) {
        fprintf(stderr, "gemmaforge: --kv-cache %s: %s\n", o->kv_cache, err.message);
        return -1;
    }
    if (o->max_seqs) sc.max_seqs = o->max_seqs;
    if (o->max_inference_queue >= 0) sc.max_queue = o->max_inference_queue;
    if (o->max_context) sc.max_context = o->max_context;
    int64_t per_seq = (sc.max_context + sc.kv_block_len - 1) / sc.kv_block_len;
    sc.kv_blocks = o->kv_blocks ? o->kv_blocks : sc.max_seqs * per_seq; /* default: every slot can reach max_context */
    if (sc.kv_blocks < per_seq) {
        fprintf(stderr, "gemmaforge: --kv-blocks %lld cannot hold one sequence of --max-context %lld (%lld blocks)\n",
                (long long)sc.kv_blocks, (long long)sc.max_context, (long long)per_seq);
        return -1;
    }
    if (o->max_resident_adapters >= 0) sc.max_adapters = o->max_resident_adapters;
    sc.max_lora_rank = o->limits.max_lora_rank;
    if (o->vision_cache_mb >= 0) sc.vision_cache_bytes = (uint64_t)o->vision_cache_mb << 20;
    sc.sched = sched;
    if (serve_start(pipe->model, &sc, out, &err)) {
        fprintf(stderr, "gemmaforge: cannot start serving: %s\n", err.message);
        return -1;
    }
    api->serving = (ApiServing){*out, pipe->model, pipe->tok, &pipe->tpl, &pipe->pre, model_config(pipe->model),
                                o->max_tokens ? o->max_tokens : 4096, 8, 1024, NULL, sched, o->device_memory, pipe};
    int tasks = o->max_image_tasks < o->image_threads ? o->image_threads : o->max_image_tasks;
    api->serving.images = work_pool_new(o->image_threads, tasks, &err);
    if (!api->serving.images) {
        fprintf(stderr, "gemmaforge: cannot start the image decoders: %s\n", err.message);
        serve_free(*out);
        *out = NULL;
        return -1;
    }
    const TextConfig *tc = &model_config(pipe->model)->text;
    int64_t window_blocks = serve_window_blocks(&sc, pipe->model);
    GF_LOGI("serving: %d sequences, queue %d, %s KV pool %lld blocks of %lld positions (%.1f MB) and %lld "
            "sliding-window blocks (%.1f MB), %d resident adapters, %d image threads (%d requests)", sc.max_seqs,
            sc.max_queue, kn_dtype_name(sc.kv_dtype), (long long)sc.kv_blocks, (long long)sc.kv_block_len,
            (double)kv_block_bytes(tc, sc.kv_block_len, KV_FULL, sc.kv_dtype) * (double)sc.kv_blocks / 1e6,
            (long long)window_blocks,
            (double)kv_block_bytes(tc, sc.kv_block_len, KV_WINDOW, sc.kv_dtype) * (double)window_blocks / 1e6,
            sc.max_adapters, o->image_threads, tasks);
    return 0;
}

/* Before the HTTP server stops: every deferred reply ends (inference
 * requests and event streams), so no connection stays suspended. */
static void end_deferred(void *cls) {
    Api *api = cls;
    if (api->serving.images) work_pool_close(api->serving.images); /* images not started: shutting_down */
    if (api->serving.serve) serve_stop(api->serving.serve);
    job_hub_close(api->job_hub);
}

static void job_event(void *cls, const char *job_id) { job_hub_notify(cls, job_id); }

/* A job's trained adapter goes to the serving engine from memory. */
static void serve_trained(void *cls, const char *name, LoraAdapter *a, KnBuffer *params) {
    serve_adapter_put(cls, name, a, params);
}
static void free_trained(void *cls, KnBuffer *params) { serve_params_free(cls, params); }

static void block_signals(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* What cmd_serve starts, so every exit stops and frees the same way. */
typedef struct {
    Metrics metrics;
    Api api;
    Pipeline *pipe;
    ServeEngine *serve;
    Jobs *jobs;
    Exports *exports;
    DevSched *sched;
} ServeParts;

/* Stops and frees what was started, in reverse order (what was not is
 * NULL); returns status. */
static int serve_teardown(ServeParts *p, int status) {
    work_pool_free(p->api.serving.images); /* before the engine its tasks submit to */
    exports_stop(p->exports);
    jobs_stop(p->jobs);
    serve_free(p->serve);
    devsched_free(p->sched); /* after both sides are gone */
    job_hub_free(p->api.job_hub);
    store_close(p->api.store);
    pipeline_close(p->pipe);
    metrics_free(&p->metrics);
    return status;
}

/* Whether serving and training take turns on the model's device: asked
 * for, or by default on a GPU, whose queued kernels would otherwise
 * interleave as they come. On the CPU backends the operating system
 * time-slices the cores far more finely than a training layer lasts
 * (`bench_serve`: decode p99 466 ms sharing the cores, 1.2 s taking turns,
 * on the random 120M model), so they share them unless asked. */
static int use_device_sched(const ServeOptions *o, const Model *m) {
    if (o->device_sched >= 0) return o->device_sched;
    return strncmp(model_backend(m)->name, "cuda", 4) == 0;
}

/* The devices found, in the start-up log. The first probe initialises the
 * CUDA runtime, which loads the driver library (dlopen, under the dynamic
 * loader's lock); made here, before any thread exists, it leaves nothing to
 * load later, when a job's memory check or a /metrics scrape probes again
 * while other threads run. (Loaded mid-flight, the loader's lock once
 * deadlocked the server against the allocator that the fault-injection
 * test interposes, libfiu's.) A GPU's free memory is not read here: that
 * would hold a context on every GPU, used or not. */
static void log_devices(void) {
    KnDeviceInfo dev[KN_MAX_DEVICES];
    int n = kn_devices_probe(dev, KN_PROBE_HELD);
    char line[1024] = "";
    size_t used = 0;
    for (int i = 0; i < n && used < sizeof line; i++) {
        int cpu = dev[i].kind == KN_DEVICE_CPU, w;
        double free_gib = (double)dev[i].memory_free / 1073741824.0,
               total_gib = (double)dev[i].memory_total / 1073741824.0;
        if (cpu)
            w = snprintf(line + used, sizeof line - used, "%scpu (%d threads, %.1f GiB free)", i ? ", " : "",
                         dev[i].n_threads, free_gib);
        else
            w = snprintf(line + used, sizeof line - used, "%scuda:%d %s (%d SMs, %.1f GiB)", i ? ", " : "",
                         dev[i].index, dev[i].name, dev[i].n_threads, total_gib);
        if (w < 0) break;
        used += (size_t)w;
    }
    GF_LOGI("devices: %s", line);
}

static int cmd_serve(int argc, char **argv) {
    ServeOptions o;
    int parsed = parse_serve(argc, argv, &o);
    if (parsed > 0) { usage(stdout); return 0; }
    if (parsed) { usage(stderr); return 2; }
    gf_log_init(o.verbose ? GF_LOG_DEBUG : GF_LOG_INFO);
    sigset_t sigs;
    block_signals(&sigs); /* before any thread exists, so only sigwait sees them */
    log_devices();         /* before any thread exists too: see its comment */
    ServeParts p;
    memset(&p, 0, sizeof p);
    metrics_init(&p.metrics);
    Api *api = &p.api;
    *api = (Api){.metrics = &p.metrics, .limits = o.limits, .started_at = gf_time_unix(), .job_hub = job_hub_new()};
    if (!api->job_hub || open_model(&o, &p.metrics.weights, &p.pipe, &api->model)) return serve_teardown(&p, 1);
    GfError err;
    if (store_open(o.data_dir, &api->store, &err)) {
        fprintf(stderr, "gemmaforge: cannot open the data directory: %s\n", err.message);
        return serve_teardown(&p, 1);
    }
    if (p.pipe && !o.no_train && use_device_sched(&o, p.pipe->model) &&
        !(p.sched = devsched_new((double)o.decode_wait_ms / 1000.0, NULL, &err))) {
        fprintf(stderr, "gemmaforge: %s\n", err.message);
        return serve_teardown(&p, 1);
    }
    if (start_serving(&o, p.pipe, p.sched, api, &p.serve)) return serve_teardown(&p, 1);
    o.http.tmp_dir = store_tmp_dir(api->store);
    if (api->model.loaded && !o.no_train) {
        JobsConfig jc = {.model_dir = o.model_dir, .model_name = api->model.id, .max_lora_rank = o.limits.max_lora_rank,
                         .base = model_weights(p.pipe->model), .gauge = &p.metrics.weights, .sched = p.serve ? p.sched : NULL,
                         .device = o.device, .precision = o.precision, .pre = &p.pipe->pre, .memory_limit = o.device_memory,
                         .n_threads = o.train_threads, .poll_s = 0.5, .disk_full_wait_s = o.disk_full_wait_s,
                         .image_limits = {.max_bytes = o.limits.image_max_bytes, .max_pixels = o.limits.image_max_pixels},
                         .on_adapter = p.serve ? serve_trained : NULL, .free_params = free_trained,
                         .on_adapter_cls = p.serve,
                         .on_event = job_event, .on_event_cls = api->job_hub};
        if (jobs_start(&jc, api->store, &p.jobs, &err)) {
            fprintf(stderr, "gemmaforge: %s\n", err.message);
            return serve_teardown(&p, 1);
        }
    }
    if (api->model.dir_ok && !o.no_export) {
        ExportsConfig xc = {.model_dir = o.model_dir, .poll_s = 0.5,
                            .image_limits = {.max_bytes = o.limits.image_max_bytes, .max_pixels = o.limits.image_max_pixels}};
        if (exports_start(&xc, api->store, &p.exports, &err)) {
            fprintf(stderr, "gemmaforge: %s\n", err.message);
            return serve_teardown(&p, 1);
        }
    }
    if (o.http.n_keys == 0) GF_LOGW("no API key configured: every route is open to anyone who can reach %s", o.http.bind_addr);
    Httpd *h = httpd_start(&o.http, api, &err);
    if (!h) {
        fprintf(stderr, "gemmaforge: %s\n", err.message);
        return serve_teardown(&p, 1);
    }
    GF_LOGI("gemmaforge %s listening on http://%s:%u (model: %s)", VERSION, o.http.bind_addr, httpd_port(h),
            api->model.id[0] ? api->model.id : "none");
    printf("listening on %s:%u\n", o.http.bind_addr, httpd_port(h));
    fflush(stdout);
    int sig = 0;
    sigwait(&sigs, &sig);
    GF_LOGI("signal %d: shutting down (draining requests for up to %u s)", sig, o.drain_s);
    httpd_stop(h, o.drain_s, end_deferred, api);
    serve_teardown(&p, 0);
    GF_LOGI("stopped");
    return 0;
}

/* The route table as JSON lines, so tests can cover every route. */
static int cmd_routes(void) {
    for (int i = 0; i < API_N_ROUTES; i++)
        printf("{\"method\":\"%s\",\"pattern\":\"%s\",\"auth\":%s}\n", API_ROUTES[i].method, API_ROUTES[i].pattern,
               API_ROUTES[i].needs_auth ? "true" : "false");
    return 0;
}

static int cmd_devices(void) {
    KnDeviceInfo dev[KN_MAX_DEVICES];
    int n = kn_devices_probe(dev, KN_PROBE_ALL);
    printf("CUDA backend %s\n", kn_cuda_built() ? "built" : "not built");
    for (int i = 0; i < n; i++) {
        char cc[32] = "";
        if (dev[i].kind == KN_DEVICE_CUDA) snprintf(cc, sizeof cc, ", compute capability %d.%d", dev[i].cc_major, dev[i].cc_minor);
        printf("%s%d  %-32s  %d %s  %.1f GiB total, %.1f GiB free%s\n", dev[i].kind == KN_DEVICE_CPU ? "cpu" : "cuda",
               dev[i].index, dev[i].name, dev[i].n_threads, dev[i].kind == KN_DEVICE_CPU ? "threads" : "SMs",
               (double)dev[i].memory_total / 1073741824.0, (double)dev[i].memory_free / 1073741824.0, cc);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        exit(argc < 2 ? 2 : 0);
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "serve") == 0) exit(cmd_serve(argc, argv));
    if (strcmp(cmd, "devices") == 0) exit(cmd_devices());
    if (strcmp(cmd, "routes") == 0) exit(cmd_routes());
    if (strcmp(cmd, "forward") == 0) exit(cli_forward(argc, argv));
    if (strcmp(cmd, "generate") == 0) exit(cli_generate(argc, argv));
    if (strcmp(cmd, "preprocess") == 0) exit(cli_preprocess(argc, argv));
    if (strcmp(cmd, "tokenize") == 0) exit(cli_tokenize(argc, argv));
    if (strcmp(cmd, "infer") == 0) exit(cli_infer(argc, argv));
    if (strcmp(cmd, "lora-step") == 0) exit(cli_lora_step(argc, argv));
    if (strcmp(cmd, "version") == 0) { printf("gemmaforge %s\n", VERSION); exit(0); }
    if (strcmp(cmd, "train") == 0) exit(cli_train(argc, argv));
    if (strcmp(cmd, "preflight") == 0) exit(cli_preflight(argc, argv));
    if (strcmp(cmd, "merge") == 0) exit(cli_merge(argc, argv));
    if (strcmp(cmd, "export-gguf") == 0) exit(cli_export_gguf(argc, argv));
    fprintf(stderr, "gemmaforge: unknown command '%s'\n", cmd);
    usage(stderr);
    exit(2);
}
