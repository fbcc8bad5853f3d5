/* model.c - a context over shared weights: its backend, opened for the
 * device asked for, and its scratch (the forward is forward.c). */
#include "model.h"
#include "model_impl.h"

#include <stdlib.h>
#include <string.h>

const GemmaConfig *model_config(const Model *m) { return &m->w->cfg; }
const ModelDir *model_dir(const Model *m) { return &m->w->dir; }
GemmaWeights *model_weights(const Model *m) { return m->w; }
const KnBackend *model_backend(const Model *m) { return &m->be; }

GfStatus model_device_alloc(const Model *m, KnBuffer *buf, size_t bytes, const char *what, GfError *err) {
    return m->be.ops->alloc(&m->be.ctx, buf, bytes ? bytes : 1, KN_F32, what, err);
}

void model_device_free(const Model *m, KnBuffer *buf) {
    if (m && buf) m->be.ops->free(&m->be.ctx, buf);
}

void model_download(const Model *m, void *host, const void *dev, size_t bytes) {
    m->be.ops->download(&m->be.ctx, host, dev, bytes);
}

void model_device_copy(const Model *m, void *dst, const void *src, size_t bytes) {
    m->be.ops->copy(&m->be.ctx, dst, src, bytes);
}

/* The precision from the options, else from GF_PRECISION in the
 * environment, else the device's default (AUTO). */
static GfStatus model_precision(const ModelOptions *opts, KnPrecision *out, GfError *err) {
    const char *env = getenv("GF_PRECISION");
    *out = KN_PRECISION_AUTO;
    if (opts && opts->precision) return kn_precision_parse(opts->precision, out, err);
    if (env && *env && kn_precision_parse(env, out, err)) return gf_error_wrap(err, NULL, "GF_PRECISION");
    return GF_OK;
}

/* An option of two values a and b: opt when set (named param), else the
 * environment variable env, else the default; *is_b = 1 for b. */
static GfStatus one_of_two(const char *opt, const char *param, const char *env, const char *a, const char *b, int dflt,
                           int *is_b, GfError *err) {
    const char *v = opt ? opt : getenv(env), *where = opt ? param : env;
    *is_b = dflt;
    if (!v || !*v) return GF_OK;
    if (strcmp(v, a) == 0 || strcmp(v, b) == 0) {
        *is_b = strcmp(v, b) == 0;
        return GF_OK;
    }
    return gf_error_set(err, GF_INVALID, "invalid_value", where, "%s must be \"%s\" or \"%s\", not \"%.32s\"", where,
                        a, b, v);
}

/* A "host" or "device" option (one_of_two); *device = 1 for "device". */
static GfStatus host_or_device(const char *opt, const char *param, const char *env, int dflt, int *device, GfError *err) {
    return one_of_two(opt, param, env, "host", "device", dflt, device, err);
}

/* Where the per-layer embedding table goes (ModelOptions.ple): 1 = host. */
static GfStatus model_ple(const ModelOptions *opts, int *host, GfError *err) {
    int device;
    GfStatus st = host_or_device(opts ? opts->ple : NULL, "ple", "GF_PLE", 0, &device, err);
    *host = !device;
    return st;
}

/* The device from the options, else from GF_DEVICE in the environment, else
 * the first GPU, else the CPU. */
static GfStatus model_device(const ModelOptions *opts, KnDeviceKind *kind, int *index, GfError *err) {
    const char *env = getenv("GF_DEVICE");
    *kind = KN_DEVICE_CPU;
    *index = 0;
    if (opts && opts->device) return kn_backend_parse(opts->device, kind, index, err);
    if (env && *env) return kn_backend_parse(env, kind, index, err) ? gf_error_wrap(err, NULL, "GF_DEVICE") : GF_OK;
    kn_default_device(kind, index);
    return GF_OK;
}

/* Where NF4 weights are quantized (ModelOptions.quantize_on): 1 = on the
 * device they are used on. */
static GfStatus model_quantize_on(const ModelOptions *opts, int *device, GfError *err) {
    return host_or_device(opts ? opts->quantize_on : NULL, "quantize_on", "GF_QUANTIZE_ON", 1, device, err);
}

/* How the training forward keeps layer inputs (ModelOptions.checkpoints):
 * 1 = bf16. The default follows the precision the context resolved. */
static GfStatus model_checkpoints(const ModelOptions *opts, KnPrecision precision, int *bf16, GfError *err) {
    return one_of_two(opts ? opts->checkpoints : NULL, "checkpoints", "GF_CHECKPOINTS", "fp32", "bf16",
                      precision == KN_PRECISION_BF16, bf16, err);
}

/* The weights as the device reads them, and a context sharing their memory. */
static GfStatus open_backend(Model *m, const ModelOptions *opts, GfError *err) {
    KnDeviceKind kind;
    int index;
    if (model_device(opts, &kind, &index, err)) return err->status;
    KnBackendOptions bo = {.n_threads = opts ? opts->n_threads : 0};
    int ple_host;
    if (model_precision(opts, &bo.precision, err) || model_ple(opts, &ple_host, err)) return err->status;
    if (weights_on_device(m->w, kind, index, bo.n_threads, ple_host, &m->wt, &bo.share, err)) return err->status;
    return kn_backend_open(kind, index, &bo, &m->be, err);
}

/* Whether weights loaded for opts leave NF4 to the device they run on: NF4
 * asked, a device other than the CPU, and quantize_on "device". */
static GfStatus model_nf4_later(const ModelOptions *opts, ModelQuant quant, int *later, GfError *err) {
    KnDeviceKind kind;
    int index, on_device;
    *later = 0;
    if (quant != MODEL_QUANT_NF4) return GF_OK;
    if (model_device(opts, &kind, &index, err) || model_quantize_on(opts, &on_device, err)) return err->status;
    *later = kind != KN_DEVICE_CPU && on_device;
    return GF_OK;
}

GfStatus model_new(GemmaWeights *w, const ModelOptions *opts, Model **out, GfError *err) {
    *out = NULL;
    Model *m = gf_calloc(1, sizeof *m, err);
    if (!m) return GF_NO_MEMORY;
    m->w = weights_retain(w);
    m->moe_chunk = moe_chunk_tokens(&w->cfg.text, opts ? opts->moe_chunk : 0);
    m->loss_chunk = opts ? opts->loss_chunk : 0;
    GfStatus st = open_backend(m, opts, err);
    if (!st) st = model_checkpoints(opts, m->be.ctx.precision, &m->checkpoints_bf16, err);
    if (st) {
        model_close(m);
        return st;
    }
    *out = m;
    return GF_OK;
}

GfStatus model_open(const char *dir, const ModelOptions *opts, Model **out, GfError *err) {
    *out = NULL;
    ModelQuant quant = opts ? opts->quantize : MODEL_QUANT_NONE;
    GemmaWeights *w = opts ? opts->weights : NULL;
    if (w && weights_quant(w) != quant)
        return gf_error_set(err, GF_CONFLICT, "quantization_mismatch", NULL,
                            "the shared base weights are %s, %s was asked for",
                            weights_quant(w) == MODEL_QUANT_NF4 ? "NF4" : "full-precision",
                            quant == MODEL_QUANT_NF4 ? "NF4" : "full precision");
    int later;
    if (model_nf4_later(opts, quant, &later, err)) return err->status;
    if (w) weights_retain(w);
    else if (weights_open(dir, quant, later, opts ? opts->gauge : NULL, &w, err)) return err->status;
    GfStatus st = model_new(w, opts, out, err);
    weights_release(w);
    return st;
}

void model_set_yield(Model *m, void (*fn)(void *cls), void *cls) {
    m->yield = fn;
    m->yield_cls = cls;
}

void model_graph_stats(const Model *m, ModelGraphStats *out) { *out = m->graphs; }

void model_layer_done(Model *m) {
    if (!m->yield) return;
    GfError err;
    if (m->be.ops->synchronize(&m->be.ctx, &err)) return; /* the pass's own synchronize reports it */
    m->yield(m->yield_cls);
}

void model_close(Model *m) {
    if (!m) return;
    if (m->be.ops) m->be.ops->free(&m->be.ctx, &m->act);
    if (m->be.ops) m->be.ops->free(&m->be.ctx, &m->vision_mem);
    if (m->be.ops) m->be.ops->free(&m->be.ctx, &m->tables.d_rows);
    free(m->vision_idx);
    kn_backend_close(&m->be);
    free(m->tables.row0);
    free(m->tables.segs);
    free(m->tables.att);
    free(m->tables.slots);
    free(m->tables.ids);
    free(m->tables.pos);
    free(m->tables.sig);
    free(m->tables.rows_host);
    free(m->tables.lora_active);
    free(m->tables.rows_key);
    weights_release(m->w);
    free(m);
}
