/* bench_shapes.c - the engine at Gemma 4's real shapes (a benchmark, not a
 * test): the text stack of E2B, E4B or 31B (GEMMA4.md §10: PLE, KV sharing,
 * the double-wide MLP, k_eq_v and the global KV heads, sliding and full
 * layers with their head dims) written with random bf16 weights to a
 * checkpoint, then on the chosen device (GF_DEVICE, else the default one):
 *
 *   copy     the device's copy bandwidth (bytes read + written per second)
 *   decode   base and rank-64 adapter, batch 1 and 16, NF4 and bf16 base,
 *            greedy (and the base drawing at temperature 1, top_p 0.95):
 *            generated tokens/s after a 128-token prompt, and the share of
 *            the bandwidth roofline (weight bytes a step reads / step time,
 *            against the copy bandwidth measured in the same run)
 *   attention  one training sequence's attention (--seq tokens, causal) on
 *            a sliding and a full layer at the shape's heads: ms per call of
 *            the kernel a prefill takes, attention_bulk and attention_dx,
 *            and TFLOP/s over the visible pairs
 *   train    QLoRA (NF4 base, rank 64 on q/k/v/o/gate/up/down, gradient
 *            checkpointing, AdamW): tokens/s, ms per step, the device memory
 *            the run took at its peak beyond what the process held when it
 *            began (train_mem_gb: the least free memory over the steps and
 *            every layer boundary of one more, untimed step) beside the jobs'
 *            estimate of it (trainer_memory less the base weights:
 *            estimate_gb), and beyond the free memory before the model was
 *            opened (process_mem_gb: the weights, the device context and the
 *            benches before it too), TFLOP/s counted as 4 x
 *            base linear parameters x tokens (forward and input gradients;
 *            the frozen base has no weight gradients) and, given
 *            --peak-tflops, that share of peak; and where the time of the
 *            extra step went (phases_s: the forward layers, the loss over
 *            the vocabulary, the backward layers, the rest), from its layer
 *            boundaries, where it synchronizes (probed_step_s: its length,
 *            longer than a timed step's by those waits)
 *
 * The same shapes as ../shared/bench/hf_anchor.py (random weights, r64 on the
 * same modules, prompt 128 and 128 new tokens), so the figures stand side by
 * side with transformers + PEFT. One JSON line per measurement.
 *
 * The random checkpoint: shapes_model.h.
 *
 * The device's default precision (bf16 on CUDA) unless GF_PRECISION says
 * otherwise; the load line says which, and the weights' bytes in device
 * memory and in the host memory the device reads (the per-layer embedding
 * table, unless GF_PLE=device), and for NF4 where it was quantized: on the
 * device as the weights were copied there, or on the host's cores at load
 * (the CPU, or GF_QUANTIZE_ON=host); the load line's seconds include it.
 * --only load stops after the load lines.
 *
 * usage: bench_shapes e2b|e4b|31b [--layers N] [--batch B] [--seq T] [--steps K]
 *        [--new N] [--only load|copy|decode|attention|train] [--no-bf16] [--peak-tflops F]
 *        [--dir DIR] [--threads N]
 *   --layers N  the first N layers of the stack (KV sharing scaled with it),
 *               to fit a smaller device or a CPU; the JSON says how many ran
 *   --dir DIR   where the checkpoint goes (default /dev/shm, else /tmp); it is
 *               removed at the end
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backward.h"
#include "convert.h"
#include "lora.h"
#include "model.h"
#include "optim.h"

#include "shapes_model.h"
#include "trainer.h"

/* ---- measurements ------------------------------------------------------ */

typedef struct {
    const Shape *s;
    int n_layers, batch, seq, steps, n_new, bf16;
    const char *only;
    double peak_tflops, copy_gbs;
    int threads;
} Run;

static const char *const TARGETS[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

static int sync_model(const Model *m, GfError *err) {
    const KnBackend *b = model_backend(m);
    return b->ops->synchronize(&b->ctx, err) ? -1 : 0;
}

static uint64_t device_free(const Model *m) {
    KnDeviceKind kind;
    int index;
    KnDeviceInfo info;
    GfError err;
    if (kn_backend_parse(model_backend(m)->name, &kind, &index, &err) || kn_device_info(kind, index, &info, &err)) return 0;
    return info.memory_free;
}

/* Device-to-device copies of min(1 GiB, an eighth of the free memory). */
static void bench_copy(Run *r, Model *m) {
    uint64_t fr = device_free(m), n = 1ull << 30;
    if (fr / 8 < n) n = fr / 8 & ~4095ull;
    KnBuffer a = {0}, b = {0};
    GfError err;
    if (n < (1u << 20) || model_device_alloc(m, &a, n, "copy source", &err) ||
        model_device_alloc(m, &b, n, "copy destination", &err)) {
        printf("{\"what\":\"copy\",\"error\":\"no room for the copy buffers\"}\n");
        model_device_free(m, &a);
        return;
    }
    const KnBackend *be = model_backend(m);
    be->ops->memset(&be->ctx, a.data, 1, n);
    for (int i = 0; i < 2; i++) model_device_copy(m, b.data, a.data, n);
    sync_model(m, &err);
    int reps = 10;
    double t0 = gf_time_mono();
    for (int i = 0; i < reps; i++) model_device_copy(m, b.data, a.data, n);
    sync_model(m, &err);
    double dt = gf_time_mono() - t0;
    r->copy_gbs = 2.0 * (double)n * reps / dt / 1e9;
    printf("{\"what\":\"copy\",\"device\":\"%s\",\"bytes\":%llu,\"gbs\":%.1f}\n", be->name, (unsigned long long)n,
           r->copy_gbs);
    model_device_free(m, &b);
    model_device_free(m, &a);
}

/* The median of t[0..n) (sorted in place). */
static double median(double *t, int n) {
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && t[j] < t[j - 1]; j--) { double x = t[j]; t[j] = t[j - 1]; t[j - 1] = x; }
    return t[n / 2];
}

static int fill_ids(int32_t *ids, int n, uint64_t *rng) {
    for (int i = 0; i < n; i++) ids[i] = 10 + (int32_t)(next_rand(rng) % (VOCAB - 1000));
    return n;
}

/* A prompt per sequence, then n_new steps over the whole batch: greedy, or
 * (draw) each token drawn at temperature 1 within the nucleus 0.95, what
 * the sampler adds to a step. The caches are the serving engine's: paged,
 * blocks of 16 from one pool, bf16 keys and values where the model
 * computes in bf16 (serve_config_default's), so that a step is one the
 * server takes. */
static void decode_case(Run *r, Model *m, const LoraBinding *lora, int B, const char *quant, int draw) {
    const int prompt = 128, block = 16;
    const int64_t cap = prompt + r->n_new + 8, blocks = (int64_t)B * ((cap + block - 1) / block);
    const TextConfig *t = &model_config(m)->text;
    int bf16 = model_backend(m)->ctx.precision == KN_PRECISION_BF16 && !kv_dtype_check(t, KN_BF16, NULL);
    KvPool pool;
    GfError perr = {0};
    if (kv_pool_init(&pool, t, model_backend(m), bf16 ? KN_BF16 : KN_F32, block, blocks, blocks, &perr)) {
        printf("{\"what\":\"decode\",\"quant\":\"%s\",\"batch\":%d,\"error\":\"%s\"}\n", quant, B, perr.message);
        return;
    }
    KvCache *c = calloc((size_t)B, sizeof *c);
    ModelSeq *seqs = calloc((size_t)B, sizeof *seqs);
    KnSampleRow *rows = calloc((size_t)B, sizeof *rows);
    int32_t *ids = malloc((size_t)prompt * B * sizeof *ids), *next = malloc((size_t)B * sizeof *next);
    uint64_t rng = 99;
    GfError err = {0};
    int ok = 1;
    for (int i = 0; draw && i < B; i++) rows[i] = (KnSampleRow){.temperature = 1.0f, .top_p = 0.95f, .rng = 7u + (uint64_t)i};
    for (int i = 0; ok && i < B; i++) {
        ok = !kv_cache_init_paged(&c[i], &pool, cap, &err);
        fill_ids(ids + (size_t)i * prompt, prompt, &rng);
        seqs[i] = (ModelSeq){&c[i], {.ids = ids + (size_t)i * prompt, .n = prompt, .last_logits_only = 1, .lora = lora}};
    }
    double t0 = gf_time_mono();
    ok = ok && !model_forward_batch_sample(m, seqs, B, rows, next, &err);
    double t1 = gf_time_mono();
    ModelGraphStats g0, g1;
    model_graph_stats(m, &g0);
    for (int k = 0; ok && k < r->n_new; k++) {
        for (int i = 0; i < B; i++) seqs[i].in = (ModelInput){.ids = &next[i], .n = 1, .last_logits_only = 1, .lora = lora};
        ok = !model_forward_batch_sample(m, seqs, B, rows, next, &err);
    }
    double t2 = gf_time_mono();
    model_graph_stats(m, &g1);
    if (!ok) {
        printf("{\"what\":\"decode\",\"quant\":\"%s\",\"batch\":%d,\"error\":\"%s\"}\n", quant, B, err.message);
    } else {
        double step = (t2 - t1) / r->n_new, bytes = step_weight_bytes(m), gbs = bytes / step / 1e9;
        printf("{\"what\":\"decode\",\"model\":\"%s\",\"layers\":%d,\"quant\":\"%s\",\"lora\":%s,\"sampling\":\"%s\",\"batch\":%d,"
               "\"kv\":\"%s\",\"prompt\":%d,\"new_tokens\":%d,\"prefill_s\":%.4f,\"step_ms\":%.3f,\"tokens_per_s\":%.1f,"
               "\"weight_bytes_per_step\":%.0f,\"weight_gbs\":%.1f,\"roofline_share\":%.3f,"
               "\"graph_steps\":{\"recorded\":%llu,\"replayed\":%llu,\"resubmitted\":%llu,\"padded\":%llu}}\n",
               r->s->name, r->n_layers, quant, lora ? "true" : "false", draw ? "t1_p0.95" : "greedy", B,
               bf16 ? "bf16" : "f32", prompt, r->n_new, t1 - t0, step * 1e3,
               B / step, bytes, gbs, r->copy_gbs > 0 ? gbs / r->copy_gbs : 0.0,
               (unsigned long long)(g1.recorded - g0.recorded), (unsigned long long)(g1.replayed - g0.replayed),
               (unsigned long long)(g1.resubmitted - g0.resubmitted), (unsigned long long)(g1.padded - g0.padded));
    }
    fflush(stdout);
    for (int i = 0; i < B; i++) kv_cache_free(&c[i]);
    kv_pool_free(&pool);
    free(c);
    free(seqs);
    free(rows);
    free(ids);
    free(next);
}

static void bench_decode(Run *r, Model *m, const char *quant) {
    LoraAdapter *a = NULL;
    LoraBinding b = {0};
    GfError err;
    if (lora_create(m, TARGETS, 7, 64, 64.0, 0, 1, &a, &err) || lora_bind(m, a, &b, &err)) {
        printf("{\"what\":\"decode\",\"error\":\"%s\"}\n", err.message);
        lora_free(a);
        return;
    }
    const int batches[] = {1, 16};
    for (int k = 0; k < 2; k++) {
        decode_case(r, m, NULL, batches[k], quant, 0);
        decode_case(r, m, NULL, batches[k], quant, 1);
        decode_case(r, m, &b, batches[k], quant, 0);
    }
    lora_binding_free(&b);
    lora_free(a);
}

/* One optimizer step as the trainer takes it: B sequences of T trained
 * tokens, gradients accumulated, clipped, AdamW. */
static GfStatus train_step(Model *m, GradWorkspace *w, LoraBinding *b, AdamW *o, int32_t *ids, const Run *r,
                           double *loss, GfError *err) {
    lora_binding_zero_grads(b);
    *loss = 0;
    for (int i = 0; i < r->batch; i++) {
        TrainSequence s = {.ids = ids + (size_t)i * r->seq, .labels = ids + (size_t)i * r->seq, .n = r->seq};
        double l;
        int64_t n;
        GfStatus st = model_backward(m, w, b, &s, 1.0f / (float)(r->batch * (r->seq - 1)), &l, &n, err);
        if (st) return st;
        *loss += l;
    }
    lora_clip_grads(b, 1.0);
    adamw_step(o, b, 1e-4);
    *loss /= (double)r->batch * (r->seq - 1);
    return sync_model(m, err) ? GF_DEVICE : GF_OK;
}

/* The least free device memory seen at a probe (device_free), and when
 * each layer boundary of the probed step came (times, n of them). */
typedef struct {
    const Model *m;
    uint64_t min_free;
    double *times;
    int n, cap;
} StepProbe;

static void probe_free(StepProbe *p) {
    uint64_t fr = device_free(p->m);
    if (fr < p->min_free) p->min_free = fr;
}

/* The yield hook's form: at every layer boundary of a step (model_layer_done
 * synchronizes first), so a step's peak is seen, not only its end's, and
 * the boundary's time is the device's. */
static void probe_hook(void *cls) {
    StepProbe *p = cls;
    probe_free(p);
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 1024;
        double *t = realloc(p->times, (size_t)cap * sizeof *t);
        if (!t) return;
        p->times = t;
        p->cap = cap;
    }
    p->times[p->n++] = gf_time_mono();
}

/* Where the probed step's time went, from its layer boundaries: each of
 * its B sequences passes L forward layers, then the loss's chunks (after
 * the last layer's replay and the final norm), then L backward layers, so
 * a sequence's boundaries number 2L + chunks. forward: to the last forward
 * layer; loss: the last layer's replay, the norm and the chunks; backward:
 * the L layers after; other: the rest of the step (the per-layer inputs'
 * backward, clipping, AdamW). Seconds; 0 when the boundaries do not fit
 * that pattern. */
typedef struct {
    double forward, loss, backward, other, total;
    int chunks;
} StepPhases;

static StepPhases step_phases(const StepProbe *p, int batch, int n_layers, double t0, double t1) {
    StepPhases ph = {0};
    ph.total = t1 - t0;
    int per = batch > 0 ? p->n / batch : 0;
    if (per * batch != p->n || per <= 2 * n_layers) return ph;
    ph.chunks = per - 2 * n_layers;
    double start = t0;
    for (int i = 0; i < batch; i++) {
        const double *b = p->times + (size_t)i * per;
        ph.forward += b[n_layers - 1] - start;
        ph.loss += b[n_layers + ph.chunks - 1] - b[n_layers - 1];
        ph.backward += b[per - 1] - b[n_layers + ph.chunks - 1];
        start = b[per - 1];
    }
    ph.other = ph.total - ph.forward - ph.loss - ph.backward;
    return ph;
}

static void bench_train(Run *r, Model *m, uint64_t free_before) {
    LoraAdapter *a = NULL;
    LoraBinding b = {0};
    GradWorkspace *w = NULL;
    AdamW o = {0};
    GfError err = {0};
    int32_t *ids = malloc((size_t)r->batch * r->seq * sizeof *ids);
    uint64_t rng = 7;
    fill_ids(ids, r->batch * r->seq, &rng);
    double loss = 0, *times = calloc((size_t)r->steps, sizeof *times);
    StepProbe probe = {m, UINT64_MAX, NULL, 0, 0};
    uint64_t free_start = device_free(m); /* the weights, the context and the benches before held */
    int ok = !lora_create(m, TARGETS, 7, 64, 64.0, 0, 1, &a, &err) && !lora_bind(m, a, &b, &err) &&
             !lora_binding_grads(&b, &err) && !grad_workspace_new(m, r->seq, 64, &w, &err) &&
             !adamw_init(&o, &b, 0.9, 0.999, 1e-8, 0.0, &err) && !train_step(m, w, &b, &o, ids, r, &loss, &err);
    for (int k = 0; ok && k < r->steps; k++) {
        double t0 = gf_time_mono();
        ok = !train_step(m, w, &b, &o, ids, r, &loss, &err);
        times[k] = gf_time_mono() - t0;
        probe_free(&probe);
    }
    /* one more step, untimed, probed at every layer boundary (the hook
     * synchronizes there, which the timed steps must not) */
    model_set_yield(m, probe_hook, &probe);
    double p0 = gf_time_mono();
    if (ok) ok = !train_step(m, w, &b, &o, ids, r, &loss, &err);
    StepPhases ph = step_phases(&probe, r->batch, model_config(m)->text.n_layers, p0, gf_time_mono());
    model_set_yield(m, NULL, NULL);
    if (!ok) {
        printf("{\"what\":\"train\",\"model\":\"%s\",\"error\":\"%s\"}\n", r->s->name, err.message);
    } else {
        double st = median(times, r->steps), tokens = (double)r->batch * r->seq;
        PreprocessConfig no_images = {0}; /* a text stack: no tower */
        TrainMemory tm;
        trainer_memory(m, &no_images, a, 1, r->seq, &tm);
        ModelMemory mem;
        weights_memory(model_weights(m), &mem);
        const TextConfig *t = &model_config(m)->text;
        double flops = 4.0 * ((double)mem.linear_params + (double)t->vocab_size * t->hidden_size) * tokens;
        double tflops = flops / st / 1e12;
        char mfu[32] = "null";
        if (r->peak_tflops > 0) snprintf(mfu, sizeof mfu, "%.4f", tflops / r->peak_tflops);
        printf("{\"what\":\"train\",\"model\":\"%s\",\"layers\":%d,\"quant\":\"nf4\",\"rank\":64,\"batch\":%d,\"seq\":%d,"
               "\"grad_ckpt\":true,\"step_s_median\":%.4f,\"tokens_per_s\":%.1f,\"train_mem_gb\":%.2f,"
               "\"estimate_gb\":%.2f,\"process_mem_gb\":%.2f,\"trainable_m\":%.2f,\"tflops\":%.2f,"
               "\"peak_tflops\":%.1f,\"mfu\":%s,\"loss\":%.4f,\"probed_step_s\":%.4f,\"phases_s\":{\"forward\":%.4f,"
               "\"loss\":%.4f,\"backward\":%.4f,\"other\":%.4f},\"loss_chunks\":%d}\n",
               r->s->name, r->n_layers, r->batch, r->seq, st, tokens / st,
               free_start > probe.min_free ? (double)(free_start - probe.min_free) / 1e9 : 0.0,
               (double)(tm.total - tm.weights) / 1e9,
               free_before > probe.min_free ? (double)(free_before - probe.min_free) / 1e9 : 0.0,
               (double)b.n_params / 1e6, tflops,
               r->peak_tflops, mfu, loss, ph.total, ph.forward, ph.loss, ph.backward, ph.other, ph.chunks);
    }
    fflush(stdout);
    adamw_free(&o);
    grad_workspace_free(w);
    lora_binding_free(&b);
    lora_free(a);
    free(ids);
    free(times);
    free(probe.times);
}

/* ---- attention ---------------------------------------------------------- */

/* Visible (query, key) pairs of a causal sequence of T tokens under a
 * sliding window (0: none). */
static double visible_pairs(int64_t T, int window) {
    double n = 0;
    for (int64_t i = 0; i < T; i++) n += (double)(window > 0 && i + 1 > window ? window : i + 1);
    return n;
}

/* Median seconds of `reps` timed runs of one of the three calls (after one
 * untimed): 0 the exact kernel a prefill takes (attention), 1 attention_bulk,
 * 2 attention_dx. */
static double time_attention(Model *m, int which, float *const *b, const KnMask *mask, int64_t T, int H, int kv, int D,
                             int reps) {
    const KnBackend *be = model_backend(m);
    GfError err;
    double t[8];
    float scale = 1.0f / sqrtf((float)D);
    if (reps > 8) reps = 8;
    for (int k = -1; k < reps; k++) {
        double t0 = gf_time_mono();
        if (which == 0) be->ops->attention(&be->ctx, b[3], b[0], b[1], b[2], T, 0, T, H, kv, D, scale, mask);
        else if (which == 1) be->ops->attention_bulk(&be->ctx, b[3], b[0], b[1], b[2], T, 0, T, H, kv, D, scale, mask);
        else be->ops->attention_dx(&be->ctx, b[4], b[5], b[6], b[0], b[1], b[2], b[3], T, 0, T, H, kv, D, scale, mask);
        if (sync_model(m, &err)) return -1;
        if (k >= 0) t[k] = gf_time_mono() - t0;
    }
    return median(t, reps);
}

/* One training sequence's attention (seq tokens, causal, no padding) at the
 * shape's heads on one kind of layer: ms per call of the prefill's kernel,
 * attention_bulk and attention_dx, and TFLOP/s counted over the visible
 * pairs (4 D a pair and head forward: q.k and p v; 8 D for the gradient's
 * four products, the recomputed scores not counted). */
static void attention_case(Run *r, Model *m, int kv, int D, int window) {
    int64_t T = r->seq;
    int H = r->s->heads;
    size_t nq = (size_t)T * H * D, nk = (size_t)T * kv * D, sizes[7] = {nq, nk, nk, nq, nq, nk, nk};
    KnBuffer bufs[8] = {{0}};
    float *b[7];
    const KnBackend *be = model_backend(m);
    GfError err = {0};
    int ok = 1;
    uint64_t rng = 11;
    float *host = malloc(nq * sizeof *host);
    for (int i = 0; ok && i < 7; i++) {
        ok = host && !model_device_alloc(m, &bufs[i], sizes[i] * sizeof(float), "attention benchmark", &err);
        if (!ok) break;
        b[i] = bufs[i].data;
        for (size_t e = 0; e < sizes[i]; e++) host[e] = (float)((double)(next_rand(&rng) >> 11) / 9007199254740992.0 * 2 - 1);
        be->ops->upload(&be->ctx, b[i], host, sizes[i] * sizeof(float));
    }
    if (ok) ok = !model_device_alloc(m, &bufs[7], (size_t)T, "attention benchmark", &err);
    if (ok) be->ops->memset(&be->ctx, bufs[7].data, 1, (size_t)T);
    KnMask mask = {ok ? bufs[7].data : NULL, NULL, window};
    int reps = T * (double)T * H * D > 1e10 ? 5 : 3;
    double ms[3] = {0}, pairs = visible_pairs(T, window) * H;
    for (int w = 0; ok && w < 3; w++) ok = (ms[w] = time_attention(m, w, b, &mask, T, H, kv, D, reps) * 1e3) > 0;
    if (!ok)
        printf("{\"what\":\"attention\",\"model\":\"%s\",\"head_dim\":%d,\"error\":\"%s\"}\n", r->s->name, D,
               err.message[0] ? err.message : "the device failed");
    else
        printf("{\"what\":\"attention\",\"model\":\"%s\",\"seq\":%lld,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
               "\"window\":%d,\"precision\":\"%s\",\"prefill_kernel_ms\":%.3f,\"bulk_ms\":%.3f,\"dx_ms\":%.3f,"
               "\"prefill_kernel_tflops\":%.4f,\"bulk_tflops\":%.4f,\"dx_tflops\":%.4f}\n",
               r->s->name, (long long)T, H, kv, D, window, kn_precision_name(be->ctx.precision), ms[0], ms[1], ms[2],
               4.0 * D * pairs / ms[0] / 1e9, 4.0 * D * pairs / ms[1] / 1e9, 8.0 * D * pairs / ms[2] / 1e9);
    fflush(stdout);
    for (int i = 0; i < 8; i++) model_device_free(m, &bufs[i]);
    free(host);
}

static void bench_attention(Run *r, Model *m) {
    attention_case(r, m, r->s->kv, HEAD_DIM, r->s->window);
    attention_case(r, m, r->s->kv_full, HEAD_DIM_FULL, 0);
}

static int wants(const Run *r, const char *what) { return !r->only || strcmp(r->only, what) == 0; }

/* Opens the checkpoint under quant and runs what this run wants on it. */
static int bench_quant(Run *r, const char *dir, ModelQuant q) {
    GfError err;
    Model *m = NULL;
    KnDeviceKind kind;
    int index;
    KnDeviceInfo info = {0};
    kn_default_device(&kind, &index);
    const char *env = getenv("GF_DEVICE");
    if (env && *env && kn_backend_parse(env, &kind, &index, &err)) { fprintf(stderr, "%s\n", err.message); return 1; }
    kn_device_info(kind, index, &info, &err);
    WeightsGauge gauge = {0};
    ModelOptions mo = {.n_threads = r->threads, .quantize = q, .gauge = &gauge};
    double t0 = gf_time_mono();
    if (model_open(dir, &mo, &m, &err)) { fprintf(stderr, "%s\n", err.message); return 1; }
    const char *qn = q == MODEL_QUANT_NF4 ? "nf4" : "bf16";
    const char *on = q != MODEL_QUANT_NF4 ? "" : weights_nf4_later(model_weights(m)) ? "device" : "host";
    const KnBackend *be = model_backend(m);
    printf("{\"what\":\"load\",\"model\":\"%s\",\"layers\":%d,\"quant\":\"%s\",\"quantized_on\":\"%s\","
           "\"device\":\"%s\",\"device_name\":\"%s\","
           "\"precision\":\"%s\",\"seconds\":%.1f,\"weight_bytes_per_step\":%.0f,\"device_weight_bytes\":%llu,"
           "\"mapped_weight_bytes\":%llu}\n",
           r->s->name, r->n_layers, qn, on, be->name, info.name, kn_precision_name(be->ctx.precision), gf_time_mono() - t0,
           step_weight_bytes(m), (unsigned long long)atomic_load(&gauge.device_bytes),
           (unsigned long long)atomic_load(&gauge.mapped_bytes));
    fflush(stdout);
    if (r->copy_gbs == 0 && (wants(r, "copy") || wants(r, "decode"))) bench_copy(r, m);
    if (wants(r, "decode")) bench_decode(r, m, qn);
    if (q == MODEL_QUANT_NF4 && wants(r, "attention")) bench_attention(r, m);
    if (q == MODEL_QUANT_NF4 && wants(r, "train")) bench_train(r, m, info.memory_free);
    model_close(m);
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: bench_shapes e2b|e4b|31b [--layers N] [--batch B] [--seq T] [--steps K] [--new N]\n"
                    "       [--only load|copy|decode|attention|train] [--no-bf16] [--peak-tflops F] [--dir DIR] [--threads N]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    Run r = {.batch = 4, .seq = 1024, .steps = 5, .n_new = 128, .bf16 = 1, .s = shape_find(argv[1])};
    if (!r.s) return usage();
    if (strcmp(r.s->name, "31b") == 0) r.batch = 1;
    r.n_layers = r.s->layers;
    const char *dir_base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    for (int i = 2; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(argv[i], "--no-bf16") == 0) { r.bf16 = 0; continue; }
        if (!v) return usage();
        if (strcmp(argv[i], "--layers") == 0) r.n_layers = atoi(v);
        else if (strcmp(argv[i], "--batch") == 0) r.batch = atoi(v);
        else if (strcmp(argv[i], "--seq") == 0) r.seq = atoi(v);
        else if (strcmp(argv[i], "--steps") == 0) r.steps = atoi(v);
        else if (strcmp(argv[i], "--new") == 0) r.n_new = atoi(v);
        else if (strcmp(argv[i], "--only") == 0) r.only = v;
        else if (strcmp(argv[i], "--peak-tflops") == 0) r.peak_tflops = atof(v);
        else if (strcmp(argv[i], "--dir") == 0) dir_base = v;
        else if (strcmp(argv[i], "--threads") == 0) r.threads = atoi(v);
        else return usage();
        i++;
    }
    if (r.n_layers < 1 || r.n_layers > r.s->layers || r.batch < 1 || r.seq < 2 || r.steps < 1 || r.n_new < 1)
        return usage();
    gf_log_init(GF_LOG_WARN);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/gf-shapes-XXXXXX", dir_base);
    if (!mkdtemp(dir)) { perror(dir); return 1; }
    uint64_t bytes = 0;
    double t0 = gf_time_mono();
    int rc = shape_write(dir, r.s, r.n_layers, &bytes);
    printf("{\"what\":\"checkpoint\",\"model\":\"%s\",\"layers\":%d,\"kv_shared\":%d,\"bytes\":%llu,\"seconds\":%.1f%s}\n",
           r.s->name, r.n_layers, shape_kv_shared(r.s, r.n_layers), (unsigned long long)bytes, gf_time_mono() - t0,
           rc ? ",\"error\":\"cannot write the checkpoint\"" : "");
    fflush(stdout);
    if (!rc) rc = bench_quant(&r, dir, MODEL_QUANT_NF4);
    if (!rc && r.bf16 && wants(&r, "decode")) rc = bench_quant(&r, dir, MODEL_QUANT_NONE);
    shape_remove(dir);
    return rc;
}
