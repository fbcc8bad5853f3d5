/* test_memory_estimate.c - what a training job is estimated to take on its
 * device (trainer_memory: the figure preflight prints and the jobs' fit
 * check refuses by) against what it allocates there, on the guarded
 * backend, whose device memory counts every buffer (kn_guarded_memory).
 *
 * For dense, ple and moe, with the linears as stored and in NF4, the
 * adapter with dropout on the text layers' linears (and, in NF4, on every
 * linear, the vision tower's too: its images then run its training
 * buffers): the model is
 * opened, the adapter bound, two training steps run over examples with and
 * without images, and a validation set whose longest example is longer than
 * any training one (the workspace grows to it). The device's peak over all
 * of it must not pass the estimate at the longest sequence run (the fit
 * check would let a job in that then runs out of memory), and the estimate
 * must not be loose: it counts nothing beyond the peak but the vision
 * tower's workspace at the processor's budget beyond what these images'
 * patches need (none: they fill it). Every buffer is counted as asked of
 * the backend, so the two meet to the byte.
 *
 * A GPU context also keeps scratch, which the guarded backend has none of:
 * every scratch-taking call the job makes there (kn_guarded_watch) is
 * priced by the CUDA table (its scratch_bytes, which needs no GPU) in both
 * precisions, and the largest must not pass the estimate's scratch for a
 * CUDA context (grad_scratch_bytes), so that the fit check on a GPU counts
 * what its calls will take. Skipped in a build without the CUDA backend. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../unit/check.h"
#include "backward.h"
#include "kernels.h"
#include "pipeline.h"
#include "../unit/tar_put.h"
#include "trainer.h"

static const char *IMAGES[] = {"tiny.png", "wide.png"};
#define N_IMAGES 2

static void write_tar(const char *path) {
    FILE *f = fopen(path, "wb");
    for (int k = 0; k < N_IMAGES; k++) {
        char src[512];
        snprintf(src, sizeof src, GF_FIXTURES "/images/%s", IMAGES[k]);
        size_t n = 0;
        GfError err;
        uint8_t *b = (uint8_t *)gf_read_file(src, 1u << 20, "fixture", &n, &err);
        CHECK(b != NULL, "fixture %s: %s", src, err.message);
        tar_put(f, IMAGES[k], b, b ? n : 0);
        free(b);
    }
    tar_end(f);
    fclose(f);
}

/* n examples, every other one with an image; each answer `words` words. */
static void write_jsonl(const char *path, int n, int words) {
    FILE *f = fopen(path, "w");
    for (int i = 0; i < n; i++) {
        fputs("{\"messages\":[{\"role\":\"user\",\"content\":[", f);
        if (i % 2 == 0) fprintf(f, "{\"type\":\"image\",\"image\":\"%s\"},", IMAGES[(i / 2) % N_IMAGES]);
        fprintf(f, "{\"type\":\"text\",\"text\":\"describe %d\"}]},{\"role\":\"assistant\",\"content\":\"", i);
        for (int w = 0; w < words; w++) fputs(w % 3 ? " blue" : " red", f);
        fputs("\"}]}\n", f);
    }
    fclose(f);
}

typedef struct {
    const char *train, *val, *tar;
} Files;

/* The scratch a CUDA context of each precision (fp32, bf16) would keep for
 * the calls watched, beyond what it keeps for any call (cuBLAS's
 * workspaces): the most of each entry, and the call that asked it. */
typedef struct {
    KnBackend cu[2];
    uint64_t most[2][KN_OP_COUNT];
    KnCall worst[2][KN_OP_COUNT];
    uint64_t calls[KN_OP_COUNT];
} CallPrices;

/* A call's own scratch on b: its price less that of a call taking none. */
static uint64_t own_price(const KnBackend *b, const KnCall *call) {
    KnCall none = {.op = KN_OP_COUNT};
    return kn_scratch_bytes(b, call) - kn_scratch_bytes(b, &none);
}

static void price_call(void *user, const KnCall *call) {
    CallPrices *p = user;
    if ((unsigned)call->op >= KN_OP_COUNT) return;
    p->calls[call->op]++;
    for (int k = 0; k < 2; k++) {
        uint64_t b = own_price(&p->cu[k], call);
        if (b > p->most[k][call->op]) {
            p->most[k][call->op] = b;
            p->worst[k][call->op] = *call;
        }
    }
}

/* A CUDA table of each precision, without a device; 0 in a build without it. */
static int cuda_prices(CallPrices *p) {
    memset(p, 0, sizeof *p);
    const KnOps *ops = kn_backend_ops(KN_DEVICE_CUDA);
    if (!ops) return 0;
    for (int k = 0; k < 2; k++) {
        p->cu[k].ops = ops;
        p->cu[k].ctx.device = KN_DEVICE_CUDA;
        p->cu[k].ctx.precision = k ? KN_PRECISION_BF16 : KN_PRECISION_FP32;
    }
    return 1;
}

/* A table whose scratch_bytes is a CUDA table's own price for one entry
 * and 0 for the others (the OneEntry at ctx->impl): the estimate's share
 * of that entry. */
typedef struct {
    KnOpId op;
    const KnOps *cuda;
} OneEntry;

static size_t one_entry(const KnCtx *ctx, const KnCall *call) {
    const OneEntry *e = ctx->impl;
    KnBackend b = {.ops = e->cuda, .ctx = *ctx};
    b.ctx.impl = NULL;
    return call->op == e->op ? own_price(&b, call) : 0;
}

/* The most the estimate (grad_scratch_bytes) allows entry op of a CUDA
 * context of precision prec. */
static uint64_t estimate_of(const CallPrices *p, int prec, KnOpId op, Pipeline *pl, const LoraAdapter *a, int nf4,
                            int64_t longest, int64_t patches) {
    OneEntry e = {op, p->cu[prec].ops};
    KnOps ops = *e.cuda;
    ops.scratch_bytes = one_entry;
    KnBackend b = {.ops = &ops, .ctx = p->cu[prec].ctx};
    b.ctx.impl = &e;
    return grad_scratch_bytes(pl->model, &b, longest, a, nf4, patches);
}

/* Each entry's calls against the estimate's share of that entry, for a
 * CUDA context of either precision. */
static void check_prices(const CallPrices *p, Pipeline *pl, const LoraAdapter *a, int nf4, int64_t longest,
                         const char *model, const char *q) {
    int64_t patches = model_config(pl->model)->vision.present ? preprocess_max_patches(&pl->pre) : 0;
    static const char *const names[] = {"fp32", "bf16"};
    static const char *const ops[KN_OP_COUNT] = {"matmul", "matmul_dx", "embed_rows", "attention_dx", "lora_shrink",
                                                 "lora_shrink_dx", "moe_experts", "moe_experts_dx"};
    CHECK(p->calls[KN_OP_MATMUL] > 0 && p->calls[KN_OP_MATMUL_DX] > 0 && p->calls[KN_OP_ATTENTION_DX] > 0 &&
              p->calls[KN_OP_LORA_SHRINK] > 0 && p->calls[KN_OP_LORA_SHRINK_DX] > 0,
          "%s (%s): the job's scratch-taking calls were watched", model, q);
    for (int k = 0; k < 2; k++) {
        int priced = 0, tight = 0;
        for (int op = 0; op < KN_OP_COUNT; op++) {
            if (!p->calls[op]) continue;
            uint64_t est = estimate_of(p, k, (KnOpId)op, pl, a, nf4, longest, patches);
            const KnCall *w = &p->worst[k][op];
            if (p->most[k][op] && p->most[k][op] == est) tight++;
            if (p->most[k][op]) priced++;
            CHECK(p->most[k][op] <= est,
                  "%s (%s) on CUDA %s: a %s call of %lld rows (weights %lldx%lld) asks %llu bytes of scratch, more "
                  "than the %llu estimated",
                  model, q, names[k], ops[op], (long long)w->n, (long long)w->w.rows, (long long)w->w.cols,
                  (unsigned long long)p->most[k][op], (unsigned long long)est);
        }
        printf("  %s (%s) on CUDA %s: %d entries' calls take scratch, each within the estimate (%d of them reach it)\n",
               model, q, names[k], priced, tight);
    }
}

/* The most patches an image of set has. */
static int64_t most_patches(TrainSet *set) {
    TrainExample ex;
    memset(&ex, 0, sizeof ex);
    int64_t most = 0;
    GfError err;
    for (size_t i = 0; i < trainset_count(set); i++) {
        CHECK_STATUS(trainset_example(set, i, &ex, &err), GF_OK, err);
        if (ex.seq.n_images && ex.seq.n_patches > most) most = ex.seq.n_patches;
    }
    train_example_free(&ex);
    return most;
}

/* targets: the text layers' linears, or "all-linear" (the tower's too, whose
 * images then run its training buffers). */
static void run(const char *model, ModelQuant quant, int all_linear, const Files *fs) {
    char dir[256];
    snprintf(dir, sizeof dir, GF_FIXTURES "/%s", model);
    char q[32];
    snprintf(q, sizeof q, "%s%s", quant == MODEL_QUANT_NF4 ? "nf4" : "as stored", all_linear ? ", all-linear" : "");
    GfError err;
    Pipeline *p = NULL;
    TrainSet *train = NULL, *val = NULL;
    LoraAdapter *a = NULL;
    Trainer *t = NULL;
    ModelOptions mo = {.device = "guarded", .n_threads = 2, .quantize = quant};
    ImageLimits lim = {20u << 20, 50000000};
    const char *text[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    const char *all[] = {"all-linear"};
    CHECK_STATUS(pipeline_open(dir, &mo, &p, &err), GF_OK, err);
    if (!p) return;
    CHECK_STATUS(trainset_open(p, fs->train, fs->tar, 4096, &lim, TRAINSET_DECODE_IMAGES, &train, &err), GF_OK, err);
    CHECK_STATUS(trainset_open(p, fs->val, fs->tar, 4096, &lim, TRAINSET_DECODE_IMAGES, &val, &err), GF_OK, err);
    CHECK_STATUS(lora_create(p->model, all_linear ? all : text, all_linear ? 1 : sizeof text / sizeof *text, 8, 16.0, 0, 3,
                             &a, &err),
                 GF_OK, err);
    if (!train || !val || !a) goto done;
    a->dropout = 0.1;
    int64_t longest = trainset_max_tokens(val), trained = trainset_max_tokens(train);
    CHECK(longest > trained, "%s: validation grows the workspace (%lld > %lld)", model, (long long)longest,
          (long long)trained);
    TrainConfig cfg = {.epochs = 2, .batch_size = 2, .grad_accum = 1, .lr = 1e-3, .max_grad_norm = 1.0,
                       .schedule = SCHED_LINEAR, .seed = 5};
    CallPrices prices;
    int priced = cuda_prices(&prices);
    if (priced) CHECK_STATUS(kn_guarded_watch(model_backend(p->model), price_call, &prices, &err), GF_OK, err);
    CHECK_STATUS(trainer_new(p->model, a, train, &cfg, &t, &err), GF_OK, err);
    if (!t) goto done;
    TrainStepInfo info;
    double loss = 0.0;
    for (int s = 0; s < 2; s++) CHECK_STATUS(trainer_step(t, NULL, NULL, &info, &err), GF_OK, err);
    CHECK_STATUS(trainer_eval(t, val, NULL, NULL, &loss, &err), GF_OK, err);
    CHECK_STATUS(trainer_step(t, NULL, NULL, &info, &err), GF_OK, err);

    if (priced) {
        CHECK_STATUS(kn_guarded_watch(model_backend(p->model), NULL, NULL, &err), GF_OK, err);
        check_prices(&prices, p, a, quant == MODEL_QUANT_NF4, longest, model, q);
    }
    uint64_t held = 0, peak = 0;
    CHECK_STATUS(kn_guarded_memory(model_backend(p->model), &held, &peak, &err), GF_OK, err);
    TrainMemory tm;
    trainer_memory(p->model, &p->pre, a, quant == MODEL_QUANT_NF4, longest, &tm);
    int64_t patches = most_patches(train), in_val = most_patches(val);
    if (in_val > patches) patches = in_val;
    uint64_t ran = model_vision_workspace_bytes(p->model, patches, 8, all_linear);
    CHECK(patches > 0 && ran <= tm.vision, "%s: images of %lld patches, within the budget", model, (long long)patches);
    uint64_t slack = tm.vision - ran;
    printf("  %s (%s) T%lld: peak %llu bytes, estimate %llu (weights %llu, state %llu, activations %llu, vision %llu, "
           "scratch %llu)\n",
           model, q, (long long)longest, (unsigned long long)peak, (unsigned long long)tm.total,
           (unsigned long long)tm.weights, (unsigned long long)tm.state, (unsigned long long)tm.activations,
           (unsigned long long)tm.vision, (unsigned long long)tm.scratch);
    CHECK(peak <= tm.total, "%s (%s): the device held %llu bytes at its peak, more than the %llu estimated", model, q,
          (unsigned long long)peak, (unsigned long long)tm.total);
    CHECK(tm.total <= peak + slack, "%s (%s): the estimate %llu passes the peak %llu by more than %llu", model, q,
          (unsigned long long)tm.total, (unsigned long long)peak, (unsigned long long)slack);
done:
    if (p) kn_guarded_watch(model_backend(p->model), NULL, NULL, &err);
    trainer_free(t);
    lora_free(a);
    trainset_close(val);
    trainset_close(train);
    pipeline_close(p);
}

int main(void) {
    char base[] = "/tmp/gf-memest-XXXXXX";
    if (!mkdtemp(base)) return 1;
    char train[300], val[300], tar[300];
    snprintf(train, sizeof train, "%s/train.jsonl", base);
    snprintf(val, sizeof val, "%s/val.jsonl", base);
    snprintf(tar, sizeof tar, "%s/images.tar", base);
    write_tar(tar);
    write_jsonl(train, 4, 6);
    write_jsonl(val, 2, 40);
    Files fs = {train, val, tar};
    const char *models[] = {"dense", "ple", "moe"};
    for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
        run(models[i], MODEL_QUANT_NONE, 0, &fs);
        run(models[i], MODEL_QUANT_NF4, 0, &fs);
        run(models[i], MODEL_QUANT_NF4, 1, &fs);
    }
    unlink(train);
    unlink(val);
    unlink(tar);
    rmdir(base);
    return check_done("test_memory_estimate");
}
