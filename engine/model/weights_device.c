/* weights_device.c - the base weights copied to a device other than the
 * CPU, once per device, shared by every context on it.
 *
 * What is copied: every arena chunk (the widened, NF4 and derived arrays:
 * all in use) and every matrix the model reads straight from the mapped
 * checkpoint, each once; never the checkpoint's unused tensors or the
 * stored linears NF4 replaced. Deferred NF4 (weights_impl.h) is made here:
 * each stored linear goes through a staging buffer to the backend's
 * nf4_quantize, which writes its arrays into the copy (unless the host has
 * made its own already: they are in the arena, copied with it).
 *
 * One device buffer holds them all, but the per-layer embedding table when
 * it stays in host memory the device reads (a second, mapped buffer); a
 * host address becomes a device address by its offset in its span. Every
 * pointer of WeightsTensors is translated, so a field this file forgets
 * stays a host address, which the guarded backend refuses. */
#include <stdlib.h>
#include <string.h>

#include "nf4.h"
#include "weights_impl.h"

#define ALIGN 256

typedef struct {
    const uint8_t *host;
    size_t len, off;          /* off: in its buffer */
    int mapped;               /* in the mapped buffer, not the device one */
} Span;

typedef struct {
    Span *spans;
    size_t n, cap, total[2];  /* total: of the device buffer [0] and the mapped one [1] */
    const GemmaWeights *gw;
    char *dev[2];             /* the buffers (translate) */
    int missing;              /* a pointer no span covers */
    size_t *nf4_off;          /* [n_nf4] deferred NF4 quantized on the device: where each one's arrays start in
                                 the device buffer (nf4_arrays); NULL otherwise */
} Spans;

static int add_span(Spans *s, const void *p, size_t len, int mapped) {
    for (size_t i = 0; i < s->n; i++)
        if (s->spans[i].host == p) return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        Span *n = realloc(s->spans, cap * sizeof *n);
        if (!n) return -1;
        s->spans = n;
        s->cap = cap;
    }
    s->spans[s->n++] = (Span){p, len, s->total[mapped], mapped};
    s->total[mapped] += (len + ALIGN - 1) / ALIGN * ALIGN;
    return 0;
}

/* The device address of host address p (NULL stays NULL). */
static void *translate(Spans *s, const void *p) {
    if (!p) return NULL;
    const uint8_t *q = p;
    for (size_t i = 0; i < s->n; i++)
        if (q >= s->spans[i].host && q < s->spans[i].host + s->spans[i].len)
            return s->dev[s->spans[i].mapped] + s->spans[i].off + (size_t)(q - s->spans[i].host);
    s->missing = 1;
    return NULL;
}

/* ---- every tensor of WeightsTensors, by kind ---------------------------------------- */

typedef struct {
    void (*mat)(KnMatrix *m, void *cls);
    void (*vec)(float **v, void *cls);
    void *cls;
} Visit;

static void visit_layer(Layer *l, const Visit *v) {
    KnMatrix *mats[] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down, &l->ple_gate, &l->ple_proj,
                        &l->router, &l->experts_gate_up, &l->experts_down};
    float **vecs[] = {&l->input_ln, &l->post_attn_ln, &l->pre_ff_ln, &l->post_ff_ln, &l->q_norm, &l->k_norm,
                      &l->post_ple_ln, &l->router_scale, &l->per_expert_scale, &l->router_in_scale, &l->pre_ff_ln2,
                      &l->post_ff_ln1, &l->post_ff_ln2, &l->inv_freq};
    for (size_t i = 0; i < sizeof mats / sizeof *mats; i++) v->mat(mats[i], v->cls);
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++) v->vec(vecs[i], v->cls);
}

static void visit_vision_layer(VisionLayer *l, const Visit *v) {
    ClipLinear *mats[] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down};
    float **vecs[] = {&l->input_ln, &l->post_attn_ln, &l->pre_ff_ln, &l->post_ff_ln, &l->q_norm, &l->k_norm};
    for (size_t i = 0; i < sizeof mats / sizeof *mats; i++) v->mat(&mats[i]->w, v->cls);
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++) v->vec(vecs[i], v->cls);
}

static void visit_all(WeightsTensors *t, const GemmaConfig *cfg, const Visit *v) {
    v->mat(&t->embed, v->cls);
    v->mat(&t->embed_ple, v->cls);
    v->mat(&t->ple_model_proj, v->cls);
    v->vec(&t->ple_norm, v->cls);
    v->vec(&t->final_norm, v->cls);
    for (int i = 0; i < cfg->text.n_layers; i++) visit_layer(&t->layers[i], v);
    if (!cfg->vision.present) return;
    VisionWeights *w = &t->vision;
    v->mat(&w->input_proj, v->cls);
    v->mat(&w->pos_table, v->cls);
    v->mat(&w->embed_proj, v->cls);
    float **vecs[] = {&w->std_bias, &w->std_scale, &w->inv_freq, &w->pool_grad_scale};
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++) v->vec(vecs[i], v->cls);
    for (int i = 0; i < cfg->vision.n_layers; i++) visit_vision_layer(&w->layers[i], v);
}

/* ---- deferred NF4 (weights_impl.h) ---------------------------------------------------- */

/* q's arrays laid out from off in the device buffer (the codes, the int8
 * absmax, the group scales, each aligned); returns the end. */
static size_t nf4_arrays(const KnNf4 *q, char *base, size_t off, KnNf4 *out) {
    size_t nc = (size_t)(q->n + 1) / 2, na = (size_t)q->n_blocks, ng = (size_t)q->n_groups * sizeof(float);
    size_t ac = off, aa = ac + (nc + ALIGN - 1) / ALIGN * ALIGN, ag = aa + (na + ALIGN - 1) / ALIGN * ALIGN;
    if (out) {
        out->codes = (uint8_t *)(base + ac);
        out->absmax_q = (int8_t *)(base + aa);
        out->group_scale = (float *)(base + ag);
    }
    return ag + (ng + ALIGN - 1) / ALIGN * ALIGN;
}

/* Deferred NF4: room in the device buffer for every linear's arrays, which
 * the backend fills (quantize_on_device); none once the host has its own
 * (a CPU context came first: they are in the arena, uploaded with it). */
static int nf4_spans(Spans *s) {
    const GemmaWeights *gw = s->gw;
    if (!gw->nf4_src || atomic_load(&gw->nf4_host_ready)) return 0;
    if (!(s->nf4_off = calloc(gw->n_nf4 + 1, sizeof *s->nf4_off))) return -1;
    for (size_t i = 0; i < gw->n_nf4; i++) {
        s->nf4_off[i] = s->total[0];
        s->total[0] = nf4_arrays(&gw->nf4[i], NULL, s->total[0], NULL);
    }
    return 0;
}

/* Every deferred linear uploaded as stored into a staging buffer and
 * quantized there by the backend into d's arrays. */
static GfStatus quantize_on_device(const GemmaWeights *gw, WeightsDevice *d, GfError *err) {
    const KnBackend *be = &d->be;
    double t0 = gf_time_mono();
    size_t most_src = 1, most_scratch = 1;
    for (size_t i = 0; i < gw->n_nf4; i++) {
        const KnMatrix *w = &gw->nf4_src[i];
        size_t bytes = (size_t)(w->rows * w->cols) * kn_dtype_size(w->dtype), sc = kn_nf4_scratch_bytes(w->rows * w->cols);
        most_src = bytes > most_src ? bytes : most_src;
        most_scratch = sc > most_scratch ? sc : most_scratch;
    }
    KnBuffer stage = {0}, scratch = {0};
    GfStatus st = be->ops->alloc(&be->ctx, &stage, most_src, KN_U8, "the staging of a linear to quantize to NF4", err);
    if (!st) st = be->ops->alloc(&be->ctx, &scratch, most_scratch, KN_U8, "the NF4 quantization's scratch", err);
    for (size_t i = 0; !st && i < gw->n_nf4; i++) {
        const KnMatrix *w = &gw->nf4_src[i];
        be->ops->upload(&be->ctx, stage.data, w->data, (size_t)(w->rows * w->cols) * kn_dtype_size(w->dtype));
        be->ops->nf4_quantize(&be->ctx, &d->nf4[i], (KnMatrix){stage.data, w->dtype, w->rows, w->cols, 0, 0}, scratch.data);
    }
    if (!st) st = be->ops->synchronize(&be->ctx, err);
    be->ops->free(&be->ctx, &stage);
    be->ops->free(&be->ctx, &scratch);
    if (!st)
        GF_LOGI("model: %zu linears quantized to NF4 on %s in %.1f s", gw->n_nf4, be->name, gf_time_mono() - t0);
    return st;
}

/* Pass 1: the spans (arena chunks first, then the checkpoint's matrices). */
static void span_of_mat(KnMatrix *m, void *cls) {
    Spans *s = cls;
    if (!m->data || m->dtype == KN_NF4 || weights_in_arena(s->gw, m->data)) return;
    size_t len = (size_t)(m->rows * m->cols) * kn_dtype_size(m->dtype);
    if (add_span(s, m->data, len, 0)) s->missing = 1;
}

static void span_of_vec(float **v, void *cls) { (void)v, (void)cls; /* vectors live in the arena */ }

/* Pass 2: every pointer to its device address. */
typedef struct {
    Spans *spans;
    WeightsDevice *d;
    const GemmaWeights *gw;
} Rewrite;

static void rewrite_mat(KnMatrix *m, void *cls) {
    Rewrite *r = cls;
    if (!m->data) return;
    if (m->dtype != KN_NF4) {
        m->data = translate(r->spans, m->data);
        return;
    }
    ptrdiff_t i = (const KnNf4 *)m->data - r->gw->nf4;
    if (i < 0 || (size_t)i >= r->gw->n_nf4) {
        r->spans->missing = 1;
        return;
    }
    m->data = &r->d->nf4[i];
}

static void rewrite_vec(float **v, void *cls) {
    Rewrite *r = cls;
    *v = translate(r->spans, *v);
}

/* ---- the copy ------------------------------------------------------------------------- */

static void device_free(const GemmaWeights *gw, WeightsDevice *d) {
    if (!d) return;
    if (gw->gauge && d->counted) {
        atomic_fetch_sub(&gw->gauge->device_bytes, (uint64_t)d->buf.bytes);
        atomic_fetch_sub(&gw->gauge->mapped_bytes, (uint64_t)d->map.bytes);
        atomic_fetch_sub(&gw->gauge->device_copies, 1);
    }
    if (d->be.ops) d->be.ops->free(&d->be.ctx, &d->buf);
    if (d->be.ops) d->be.ops->free(&d->be.ctx, &d->map);
    kn_backend_close(&d->be);
    free(d->t.layers);
    free(d->t.vision.layers);
    free(d->nf4);
    free(d);
}

/* d->t: the host's tensors with their own layer arrays, every pointer translated. */
static GfStatus rewrite_all(const GemmaWeights *gw, WeightsDevice *d, Spans *s, GfError *err) {
    const GemmaConfig *cfg = &gw->cfg;
    d->t = gw->host;
    d->t.layers = calloc((size_t)cfg->text.n_layers + 1, sizeof *d->t.layers);
    d->t.vision.layers = calloc((size_t)(cfg->vision.present ? cfg->vision.n_layers : 0) + 1, sizeof *d->t.vision.layers);
    d->nf4 = calloc(gw->n_nf4 + 1, sizeof *d->nf4);
    if (!d->t.layers || !d->t.vision.layers || !d->nf4)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for the weights' device tables");
    memcpy(d->t.layers, gw->host.layers, (size_t)cfg->text.n_layers * sizeof *d->t.layers);
    if (cfg->vision.present)
        memcpy(d->t.vision.layers, gw->host.vision.layers, (size_t)cfg->vision.n_layers * sizeof *d->t.vision.layers);
    for (size_t i = 0; i < gw->n_nf4; i++) {
        d->nf4[i] = gw->nf4[i];
        if (s->nf4_off) { /* filled on the device next */
            nf4_arrays(&gw->nf4[i], s->dev[0], s->nf4_off[i], &d->nf4[i]);
            continue;
        }
        d->nf4[i].codes = translate(s, gw->nf4[i].codes);
        d->nf4[i].absmax_q = translate(s, gw->nf4[i].absmax_q);
        d->nf4[i].group_scale = translate(s, gw->nf4[i].group_scale);
    }
    Rewrite r = {s, d, gw};
    Visit v = {rewrite_mat, rewrite_vec, &r};
    visit_all(&d->t, cfg, &v);
    if (s->missing)
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "a weight lies outside every uploaded span");
    return GF_OK;
}

/* The per-layer embedding table as a span of the mapped buffer: when asked
 * and the backend has one, and the table is a matrix of the checkpoint
 * (one in the arena travels with its chunk). Added first, so that the
 * matrices' pass finds it there. */
static int map_ple(Spans *s, const WeightsDevice *d, int ple_host) {
    const KnMatrix *m = &s->gw->host.embed_ple;
    if (!ple_host || !d->be.ops->alloc_mapped || !m->data || weights_in_arena(s->gw, m->data))
        return 0;
    return add_span(s, m->data, (size_t)(m->rows * m->cols) * kn_dtype_size(m->dtype), 1);
}

/* Fills the buffers (the mapped one, d->map, already allocated): the
 * device one by upload, the mapped one by the host's stores. */
static GfStatus copy_spans(WeightsDevice *d, Spans *s, GfError *err) {
    GfStatus st = d->be.ops->alloc(&d->be.ctx, &d->buf, s->total[0] ? s->total[0] : 1, KN_U8, "the base weights", err);
    if (st) return st;
    s->dev[0] = d->buf.data;
    s->dev[1] = d->map.data;
    for (size_t i = 0; i < s->n; i++) {
        const Span *sp = &s->spans[i];
        if (sp->mapped) memcpy(s->dev[1] + sp->off, sp->host, sp->len);
        else d->be.ops->upload(&d->be.ctx, s->dev[0] + sp->off, sp->host, sp->len);
    }
    return GF_OK;
}

/* Once every byte is written: the buffers read-only, the device drained. */
static GfStatus seal_spans(WeightsDevice *d, GfError *err) {
    if (d->be.ops->seal) d->be.ops->seal(&d->be.ctx, &d->buf);
    if (d->be.ops->seal && d->map.data) d->be.ops->seal(&d->be.ctx, &d->map);
    return d->be.ops->synchronize(&d->be.ctx, err);
}

static GfStatus upload_all(GemmaWeights *gw, WeightsDevice *d, int ple_host, GfError *err) {
    Spans s = {.gw = gw};
    if (map_ple(&s, d, ple_host)) s.missing = 1;
    for (size_t i = 0; i < gw->n_chunks; i++)
        if (add_span(&s, gw->chunks[i].base, gw->chunks[i].size, 0)) s.missing = 1;
    Visit v = {span_of_mat, span_of_vec, &s};
    visit_all(&gw->host, &gw->cfg, &v);
    if (nf4_spans(&s)) s.missing = 1;
    GfStatus st = GF_OK;
    if (s.missing) st = gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for the weights' spans");
    if (!st && s.total[1] &&
        d->be.ops->alloc_mapped(&d->be.ctx, &d->map, s.total[1], KN_U8, "the per-layer embedding table", err)) {
        GF_LOGW("model: %s; the table goes to %s's memory instead", err->message, d->be.name);
        free(s.spans);
        free(s.nf4_off);
        return upload_all(gw, d, 0, err); /* pinned host memory may be scarce where device memory is not */
    }
    if (!st) st = copy_spans(d, &s, err);
    if (!st) st = rewrite_all(gw, d, &s, err);
    if (!st && s.nf4_off) st = quantize_on_device(gw, d, err);
    if (!st) st = seal_spans(d, err);
    if (!st && s.total[1])
        GF_LOGI("model: base weights copied to %s (%.1f MB), the per-layer embedding table to host memory it reads "
                "(%.1f MB)", d->be.name, (double)s.total[0] / 1e6, (double)s.total[1] / 1e6);
    else if (!st)
        GF_LOGI("model: base weights copied to %s (%.1f MB)", d->be.name, (double)s.total[0] / 1e6);
    free(s.spans);
    free(s.nf4_off);
    return st;
}

GfStatus weights_on_device(GemmaWeights *gw, KnDeviceKind kind, int index, int n_threads, int ple_host,
                           const WeightsTensors **t, const KnBackend **share, GfError *err) {
    *t = NULL;
    *share = NULL;
    if (kind == KN_DEVICE_CPU) {
        if (gw->nf4_src && !atomic_load(&gw->nf4_host_ready)) { /* deferred NF4: the host's own arrays, once */
            pthread_mutex_lock(&gw->devices_lock);
            GfStatus st = weights_nf4_host(gw, err);
            pthread_mutex_unlock(&gw->devices_lock);
            if (st) return st;
        }
        *t = &gw->host;
        return GF_OK;
    }
    pthread_mutex_lock(&gw->devices_lock);
    WeightsDevice *d = gw->devices;
    while (d && (d->be.ctx.device != kind || d->be.ctx.index != index)) d = d->next;
    GfStatus st = GF_OK;
    if (!d) {
        d = gf_calloc(1, sizeof *d, err);
        KnBackendOptions o = {.n_threads = n_threads};
        st = d ? kn_backend_open(kind, index, &o, &d->be, err) : GF_NO_MEMORY;
        if (!st) st = upload_all(gw, d, ple_host, err);
        if (st) {
            device_free(gw, d);
            d = NULL;
        } else {
            d->next = gw->devices;
            gw->devices = d;
            if ((d->counted = gw->gauge != NULL)) {
                atomic_fetch_add(&gw->gauge->device_bytes, (uint64_t)d->buf.bytes);
                atomic_fetch_add(&gw->gauge->mapped_bytes, (uint64_t)d->map.bytes);
                atomic_fetch_add(&gw->gauge->device_copies, 1);
            }
        }
    }
    pthread_mutex_unlock(&gw->devices_lock);
    if (st) return st;
    *t = &d->t;
    *share = &d->be;
    return GF_OK;
}

/* The bytes of gw's copy on device (kind, index): its device buffer's, or
 * with mapped its mapped buffer's; 0 without such a copy. */
static uint64_t copy_bytes(GemmaWeights *gw, KnDeviceKind kind, int index, int mapped) {
    uint64_t n = 0;
    pthread_mutex_lock(&gw->devices_lock);
    for (const WeightsDevice *d = gw->devices; d; d = d->next)
        if (d->be.ctx.device == kind && d->be.ctx.index == index) n = mapped ? d->map.bytes : d->buf.bytes;
    pthread_mutex_unlock(&gw->devices_lock);
    return n;
}

uint64_t weights_device_bytes(GemmaWeights *gw, KnDeviceKind kind, int index) { return copy_bytes(gw, kind, index, 0); }

uint64_t weights_mapped_bytes(GemmaWeights *gw, KnDeviceKind kind, int index) { return copy_bytes(gw, kind, index, 1); }

void weights_devices_free(GemmaWeights *gw) {
    while (gw->devices) {
        WeightsDevice *d = gw->devices;
        gw->devices = d->next;
        device_free(gw, d);
    }
}
