/* cli_finetune.c - `gemmaforge train`: the job worker's trainer without a
 * server (see cli_train.h). */
#include "cli_train.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backward.h"
#include "cli_inputs.h"
#include "dataset.h"
#include "fsutil.h"
#include "train_run.h"

typedef struct {
    const char *model, *dataset, *images, *validation, *validation_images, *out;
    const char *device;        /* NULL: the default (model.h) */
    const char *precision;     /* NULL: the default (model.h) */
    long threads;
    long long stop_after;
    int resume;
    cJSON *hp;                 /* hyperparameters as the REST API takes them */
} TrainOptions;

/* "--learning-rate" -> "learning_rate". */
static int flag_key(const char *flag, char *key, size_t cap) {
    if (strncmp(flag, "--", 2) != 0 || strlen(flag + 2) >= cap) return -1;
    snprintf(key, cap, "%s", flag + 2);
    for (char *c = key; *c; c++)
        if (*c == '-') *c = '_';
    return 0;
}

/* A flag's value as JSON: numbers, true/false, a comma list for
 * target_modules, otherwise a string. */
static cJSON *flag_value(const char *key, const char *v) {
    char *end;
    double d = strtod(v, &end);
    if (*v && !*end) return cJSON_CreateNumber(d);
    if (strcmp(v, "true") == 0 || strcmp(v, "false") == 0) return cJSON_CreateBool(v[0] == 't');
    if (strcmp(key, "target_modules") != 0 || strcmp(v, "all-linear") == 0) return cJSON_CreateString(v);
    cJSON *arr = cJSON_CreateArray();
    char buf[512];
    snprintf(buf, sizeof buf, "%s", v);
    char *save = NULL;
    for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) cJSON_AddItemToArray(arr, cJSON_CreateString(t));
    return arr;
}

static int parse_train(int argc, char **argv, TrainOptions *o) {
    memset(o, 0, sizeof *o);
    o->hp = cJSON_CreateObject();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL, key[64];
        if (strcmp(a, "--resume") == 0) { o->resume = 1; continue; }
        if (!v) { fprintf(stderr, "gemmaforge train: %s needs a value\n", a); return -1; }
        i++;
        if (strcmp(a, "--model") == 0) o->model = v;
        else if (strcmp(a, "--dataset") == 0) o->dataset = v;
        else if (strcmp(a, "--images") == 0) o->images = v;
        else if (strcmp(a, "--validation") == 0) o->validation = v;
        else if (strcmp(a, "--validation-images") == 0) o->validation_images = v;
        else if (strcmp(a, "--out") == 0) o->out = v;
        else if (strcmp(a, "--device") == 0) {
            if (cli_parse_device(v)) return -1;
            o->device = v;
        } else if (strcmp(a, "--precision") == 0) {
            if (cli_parse_precision(v)) return -1;
            o->precision = v;
        }
        else if (strcmp(a, "--threads") == 0 && (o->threads = strtol(v, &end, 10), !*end) && o->threads >= 0 && o->threads <= 1024) {}
        else if (strcmp(a, "--stop-after-step") == 0 && (o->stop_after = strtoll(v, &end, 10), !*end) && o->stop_after >= 1) {}
        else if (flag_key(a, key, sizeof key) == 0 && !cJSON_GetObjectItemCaseSensitive(o->hp, key))
            cJSON_AddItemToObject(o->hp, key, flag_value(key, v));
        else { fprintf(stderr, "gemmaforge train: unknown option or bad value: %s %s\n", a, v); return -1; }
    }
    return 0;
}

/* ---- progress ------------------------------------------------------------------ */

typedef struct {
    FILE *metrics;             /* OUT/metrics.jsonl */
    int tty;
} Progress;

static void fmt_eta(double s, char *buf, size_t cap) {
    if (!isfinite(s)) snprintf(buf, cap, "?");
    else if (s >= 3600) snprintf(buf, cap, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    else snprintf(buf, cap, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
}

static void on_step(void *user, const TrainStepInfo *in, const TrainRunRates *r) {
    Progress *p = user;
    char eta[32], bar[31];
    fmt_eta(r->eta_s, eta, sizeof eta);
    int fill = (int)(30 * in->step / (in->total_steps ? in->total_steps : 1));
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "%s[%s] step %lld/%lld  epoch %.2f  loss %.4f  lr %.2e  %.0f tok/s  ETA %s%s", p->tty ? "\r" : "", bar,
            (long long)in->step, (long long)in->total_steps, in->epoch, in->loss, in->lr, r->tokens_per_s, eta,
            p->tty ? "   " : "\n");
    fprintf(p->metrics, "{\"step\":%lld,\"epoch\":%.6g,\"loss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens\":%lld,\"targets\":%lld,\"seconds\":%.6g}\n",
            (long long)in->step, in->epoch, in->loss, in->lr, in->grad_norm, (long long)in->tokens, (long long)in->targets, in->seconds);
    fflush(p->metrics);
}

static void on_eval(void *user, int64_t step, double loss) {
    Progress *p = user;
    fprintf(stderr, "%sstep %lld: validation loss %.4f\n", p->tty ? "\n" : "", (long long)step, loss);
    fprintf(p->metrics, "{\"step\":%lld,\"eval_loss\":%.9g}\n", (long long)step, loss);
    fflush(p->metrics);
}

static void on_log(void *user, const char *level, const char *msg) {
    Progress *p = user;
    fprintf(stderr, "%s%s: %s\n", p->tty ? "\n" : "", level, msg);
}

/* ---- resume ---------------------------------------------------------------------- */

/* The newest complete checkpoint under root (step-NNNNNNNN), or 0. */
static int64_t newest_checkpoint(const char *root) {
    DIR *d = opendir(root);
    if (!d) return 0;
    int64_t best = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        long long s = strncmp(e->d_name, "step-", 5) == 0 ? strtoll(e->d_name + 5, &end, 10) : 0;
        if (s > best && !*end) best = s;
    }
    closedir(d);
    return best;
}

/* ---- the command ------------------------------------------------------------------ */

static int fail(const char *what, const GfError *err) {
    fprintf(stderr, "gemmaforge train: %s%s%s\n", what, what[0] ? ": " : "", err->message);
    return err->status == GF_CANCELLED ? 3 : 1;
}

/* Publishes the adapter: written into OUT/.adapter-tmp, then renamed to OUT/adapter. */
static int run(const TrainOptions *o, TrainRunSpec *spec, Progress *prog) {
    char ckpt[4096], tmp[4096], final_dir[4096], resume[4096];
    snprintf(ckpt, sizeof ckpt, "%s/checkpoints", o->out);
    snprintf(tmp, sizeof tmp, "%s/.adapter-tmp", o->out);
    snprintf(final_dir, sizeof final_dir, "%s/adapter", o->out);
    int64_t from = o->resume ? newest_checkpoint(ckpt) : 0;
    if (from) train_run_ckpt_dir(ckpt, from, resume, sizeof resume);
    spec->ckpt_root = ckpt;
    spec->resume_dir = from ? resume : NULL;
    spec->adapter_out = tmp;
    GfError err;
    fs_remove_tree(tmp);
    if (fs_mkdirs(tmp, &err)) return fail("", &err);
    TrainRunHooks hooks = {.user = prog, .on_log = on_log, .on_step = on_step, .on_eval = on_eval};
    TrainRunResult res;
    GfStatus st = train_run(spec, &hooks, &res, &err);
    if (prog->tty) fputc('\n', stderr);
    if (st) {
        fs_remove_tree(tmp);
        return fail("", &err);
    }
    fs_remove_tree(final_dir);
    if (rename(tmp, final_dir) != 0) { fprintf(stderr, "gemmaforge train: cannot publish the adapter: %s\n", strerror(errno)); return 1; }
    printf("adapter written to %s\n", final_dir);
    return 0;
}

int cli_train(int argc, char **argv) {
    TrainOptions o;
    if (parse_train(argc, argv, &o) || !o.model || !o.dataset || !o.out) {
        fprintf(stderr, "usage: gemmaforge train --model DIR --dataset FILE.jsonl [--images TAR] [--validation FILE.jsonl "
                        "[--validation-images TAR]] --out DIR [--resume] [--device D] [--precision fp32|bf16] [--threads N] [--stop-after-step N]\n"
                        "       [--epochs N] [--learning-rate X] [--lr-scheduler cosine|linear|constant] [--warmup-ratio X]\n"
                        "       [--batch-size N] [--gradient-accumulation-steps N] [--lora-rank N] [--lora-alpha X]\n"
                        "       [--use-rslora true|false] [--target-modules all-linear|q_proj,v_proj,...]\n"
                        "       [--quantization nf4|none] [--max-seq-len N] [--eval-every N] [--save-every N] [--seed N]\n");
        cJSON_Delete(o.hp);
        return 2;
    }
    gf_log_init(GF_LOG_WARN);
    GfError err;
    TrainRunSpec spec = {.model_dir = o.model, .train_jsonl = o.dataset, .train_tar = o.images, .val_jsonl = o.validation,
                         .val_tar = o.validation_images, .device = o.device, .precision = o.precision,
                         .n_threads = (int)o.threads, .stop_at_step = o.stop_after};
    DatasetLimits dl;
    dataset_limits_default(&dl);
    spec.image_limits = dl.image;
    GfStatus st = hyperparameters_parse(o.hp, LORA_MAX_RANK, &spec.params, NULL, &err);
    cJSON_Delete(o.hp);
    if (st) {
        fail("", &err);
        return 2;
    }
    if (fs_mkdirs(o.out, &err)) return fail("", &err);
    char path[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", o.out);
    Progress prog = {.metrics = fopen(path, o.resume ? "ae" : "we"), .tty = isatty(STDERR_FILENO)};
    if (!prog.metrics) { fprintf(stderr, "gemmaforge train: cannot write %s: %s\n", path, strerror(errno)); return 1; }
    int rc = run(&o, &spec, &prog);
    fclose(prog.metrics);
    return rc;
}

/* ---- preflight ------------------------------------------------------------------- */

static void print_bytes(const char *what, uint64_t b, const char *note) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1024 && u < 4) { v /= 1024; u++; }
    printf("  %-34s %9.1f %-3s  %s\n", what, v, units[u], note);
}

/* 0 when the estimate fits the model's device now, else 1 (said so). */
static int print_memory(const Pipeline *p, const LoraAdapter *a, const JobParams *hp, int64_t seq_len) {
    TrainMemory tm;
    trainer_memory(p->model, &p->pre, a, hp->quantization == MODEL_QUANT_NF4, seq_len, &tm);
    char note[160];
    printf("\nmemory estimate for training (sequences run one at a time, so batch_size x "
           "gradient_accumulation_steps adds none):\n");
    snprintf(note, sizeof note, "%llu linears %s, the rest as stored", (unsigned long long)tm.n_linears,
             hp->quantization == MODEL_QUANT_NF4 ? "in NF4" : "as stored");
    print_bytes("base weights", tm.weights, note);
    snprintf(note, sizeof note, "%llu float32 parameters x 4 (weights, gradients, AdamW m and v)",
             (unsigned long long)tm.n_params);
    print_bytes("adapter training state", tm.state, note);
    snprintf(note, sizeof note, "checkpointed layer inputs, one layer re-run, K/V, for %lld tokens", (long long)seq_len);
    print_bytes("activations", tm.activations, note);
    if (tm.vision) print_bytes("vision tower (one image at a time)", tm.vision, "at the processor's soft-token budget");
    if (tm.scratch)
        print_bytes("backend scratch", tm.scratch, "the largest matmul's bf16 operands, library workspaces");
    print_bytes("total", tm.total, "");
    const KnBackend *be = model_backend(p->model);
    KnDeviceInfo dev;
    GfError err;
    if (kn_device_info(be->ctx.device, be->ctx.index, &dev, &err)) {
        printf("\ndevice %s: %s\n", be->name, err.message);
        return 1;
    }
    TrainFit fit;
    trainer_fit(&tm, 0, dev.memory_free, 0, 0, &fit);
    printf("\ndevice %s (%s, %s): %.1f MiB free now, the job needs %.1f MiB: %s\n", be->name, dev.name,
           kn_precision_name(be->ctx.precision), (double)fit.avail / 1048576.0, (double)fit.need / 1048576.0,
           fit.fits ? "it fits" : "it does NOT fit (lower max_seq_len or lora_rank, or use quantization nf4)");
    return fit.fits ? 0 : 1;
}

static void print_targets(const LoraAdapter *a, const JobParams *hp) {
    char names[256] = "";
    for (size_t i = 0; i < hp->n_targets; i++)
        snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", i ? "," : "", hp->targets[i]);
    printf("\nLoRA targets (%s, rank %d, alpha %g%s): %zu modules\n", names, hp->lora_rank, hp->lora_alpha,
           hp->use_rslora ? ", rsLoRA" : "", a->n_pairs);
    for (size_t i = 0; i < a->n_pairs; i++)
        printf("  %-72s %6lld -> %lld\n", a->pairs[i].module, (long long)a->pairs[i].in, (long long)a->pairs[i].out);
}

/* Example 1 as the model sees it: trained spans in [[ ]], image placeholders
 * counted. */
static void print_example(const Pipeline *p, const TrainSet *set) {
    const int32_t *ids, *labels;
    int64_t n;
    trainset_tokens_of(set, 0, &ids, &labels, &n);
    int32_t image_id = model_config(p->model)->image_token_id;
    printf("\nexample (line %llu): %lld tokens, %lld trained, shown [[trained]]:\n", (unsigned long long)trainset_line(set, 0),
           (long long)n, (long long)trainset_targets(set, 0));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    TokenStream ts = {0};
    GfError err;
    int trained = 0;
    for (int64_t i = 0; i < n; i++) {
        int now = labels[i] != -100;
        if (ids[i] == image_id) {
            int64_t k = i;
            while (k < n && ids[k] == image_id) k++;
            printf("<|image|> x %lld", (long long)(k - i));
            i = k - 1;
            continue;
        }
        if (now != trained) { tokenizer_stream_end(p->tok, &ts, &buf, &len, &cap, &err); fwrite(buf, 1, len, stdout); len = 0; fputs(now ? "[[" : "]]", stdout); trained = now; }
        tokenizer_stream_push(p->tok, &ts, ids[i], 0, &buf, &len, &cap, &err);
        fwrite(buf, 1, len, stdout);
        len = 0;
    }
    tokenizer_stream_end(p->tok, &ts, &buf, &len, &cap, &err);
    fwrite(buf, 1, len, stdout);
    printf("%s\n", trained ? "]]" : "");
    free(buf);
}

int cli_preflight(int argc, char **argv) {
    TrainOptions o;
    if (parse_train(argc, argv, &o) || !o.model) {
        fprintf(stderr, "usage: gemmaforge preflight --model DIR [--dataset FILE.jsonl [--images TAR]] [hyperparameters as for train]\n");
        cJSON_Delete(o.hp);
        return 2;
    }
    gf_log_init(GF_LOG_WARN);
    GfError err;
    JobParams hp;
    GfStatus st = hyperparameters_parse(o.hp, LORA_MAX_RANK, &hp, NULL, &err);
    cJSON_Delete(o.hp);
    if (st) { fail("", &err); return 2; }
    ModelOptions mo = {.device = o.device, .precision = o.precision, .n_threads = (int)o.threads};
    Pipeline *p = NULL;
    LoraAdapter *a = NULL;
    TrainSet *set = NULL;
    DatasetLimits dl;
    dataset_limits_default(&dl);
    if (pipeline_open(o.model, &mo, &p, &err)) return fail("the model", &err);
    const GemmaConfig *cfg = model_config(p->model);
    printf("model: %s (%d layers, hidden %lld, vocabulary %lld, vision tower %s)\n", o.model, cfg->text.n_layers,
           (long long)cfg->text.hidden_size, (long long)cfg->text.vocab_size, cfg->vision.present ? "yes" : "no");
    int rc = 0;
    if (lora_create(p->model, hp.targets, hp.n_targets, hp.lora_rank, hp.lora_alpha, hp.use_rslora, 0, &a, &err)) rc = fail("target_modules", &err);
    if (!rc && o.dataset && trainset_open(p, o.dataset, o.images, hp.max_seq_len, &dl.image, TRAINSET_DECODE_IMAGES, &set, &err)) rc = fail("the dataset", &err);
    if (!rc) {
        a->dropout = hp.lora_dropout;
        print_targets(a, &hp);
        rc = print_memory(p, a, &hp, set ? trainset_max_tokens(set) : hp.max_seq_len);
        if (set) print_example(p, set);
    }
    trainset_close(set);
    lora_free(a);
    pipeline_close(p);
    return rc;
}
