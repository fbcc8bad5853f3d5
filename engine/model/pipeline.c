/* pipeline.c - model + tokenizer + chat template + image processor, and the
 * path from a conversation to generated text. */
#include "pipeline.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsoncheck.h"

/* ---- processor settings ---------------------------------------------------- */

static GfStatus proc_bad(GfError *err, const char *field, const char *why) {
    return gf_error_set(err, GF_UNSUPPORTED, "unsupported_processor", field, "image processor setting %s: %s", field, why);
}

/* Every setting of the processor we read or must refuse. */
static GfStatus parse_processor(const cJSON *ip, const VisionConfig *v, PreprocessConfig *pre, GfError *err) {
    const cJSON *x;
    if ((x = cJSON_GetObjectItemCaseSensitive(ip, "patch_size")) && (!cJSON_IsNumber(x) || x->valueint != v->patch_size))
        return proc_bad(err, "patch_size", "differs from the vision config's patch_size");
    if ((x = cJSON_GetObjectItemCaseSensitive(ip, "pooling_kernel_size")) &&
        (!cJSON_IsNumber(x) || x->valueint != v->pooling_kernel))
        return proc_bad(err, "pooling_kernel_size", "differs from the vision config's pooling_kernel_size");
    if ((x = cJSON_GetObjectItemCaseSensitive(ip, "max_soft_tokens"))) {
        if (!cJSON_IsNumber(x) || x->valuedouble != (double)x->valueint) return proc_bad(err, "max_soft_tokens", "must be an integer");
        pre->max_soft_tokens = x->valueint;
    }
    static const struct { const char *name; int want; } flags[] = {
        {"do_resize", 1}, {"do_rescale", 1}, {"do_normalize", 0}, {"do_convert_rgb", 1}};
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        x = cJSON_GetObjectItemCaseSensitive(ip, flags[i].name);
        if (x && !cJSON_IsNull(x) && (!cJSON_IsBool(x) || cJSON_IsTrue(x) != flags[i].want))
            return proc_bad(err, flags[i].name, flags[i].want ? "only true is supported" : "only false is supported");
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(ip, "resample")) && (!cJSON_IsNumber(x) || x->valueint != 3))
        return proc_bad(err, "resample", "only 3 (bicubic) is supported");
    if ((x = cJSON_GetObjectItemCaseSensitive(ip, "rescale_factor")) &&
        (!cJSON_IsNumber(x) || fabs(x->valuedouble - 1.0 / 255.0) > 1e-9))
        return proc_bad(err, "rescale_factor", "only 1/255 is supported");
    PreprocessConfig probe = *pre;
    int tw, th;
    GfError e;
    if (preprocess_target_size(&probe, 64, 64, &tw, &th, &e))
        return proc_bad(err, "max_soft_tokens", "must be 70, 140, 280, 560 or 1120");
    return GF_OK;
}

GfStatus pipeline_load_processor(const char *dir, const VisionConfig *vision, PreprocessConfig *pre, GfError *err) {
    pre->patch_size = vision->patch_size;
    pre->pooling_kernel = vision->pooling_kernel;
    pre->max_soft_tokens = 280;
    static const char *const names[] = {"processor_config.json", "preprocessor_config.json"};
    for (int i = 0; i < 2; i++) {
        char path[4096];
        size_t len = 0;
        GfError ferr;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        char *text = gf_read_file(path, 1u << 20, names[i], &len, &ferr);
        if (!text && ferr.status == GF_NOT_FOUND) continue;
        if (!text) return gf_error_set(err, ferr.status, ferr.code, NULL, "%s", ferr.message);
        cJSON *root = json_parse_strict(text, len, names[i], err);
        free(text);
        if (!root) return err->status;
        const cJSON *ip = i == 0 ? cJSON_GetObjectItemCaseSensitive(root, "image_processor") : root;
        GfStatus st = cJSON_IsObject(ip) ? parse_processor(ip, vision, pre, err)
                                         : gf_error_set(err, GF_INVALID, "invalid_processor", "image_processor",
                                                        "%s has no image_processor object", names[i]);
        cJSON_Delete(root);
        return st;
    }
    return GF_OK;
}

/* ---- open / close ------------------------------------------------------------ */

GfStatus pipeline_open(const char *dir, const ModelOptions *opts, Pipeline **out, GfError *err) {
    Pipeline *p = gf_calloc(1, sizeof *p, err);
    if (!p) return GF_NO_MEMORY;
    GfStatus st = model_open(dir, opts, &p->model, err);
    if (!st) st = tokenizer_load_dir(dir, &p->tok, err);
    if (!st) st = chat_template_load_dir(dir, &p->tpl, err);
    if (!st && model_config(p->model)->vision.present)
        st = pipeline_load_processor(dir, &model_config(p->model)->vision, &p->pre, err);
    if (st) {
        pipeline_close(p);
        return st;
    }
    *out = p;
    return GF_OK;
}

void pipeline_close(Pipeline *p) {
    if (!p) return;
    model_close(p->model);
    tokenizer_free(p->tok);
    free(p);
}

/* ---- prompt ----------------------------------------------------------------- */

void prompt_free(Prompt *pr) {
    if (!pr) return;
    free(pr->ids);
    free(pr->mm_type);
    model_device_free(pr->model, &pr->soft_buf);
    memset(pr, 0, sizeof *pr);
}

/* Runs one image through preprocessing and the vision tower, appending its
 * soft tokens to pr->soft (capacity already reserved). */
static GfStatus encode_image(Pipeline *p, const Image *img, const PreprocessConfig *pre, Prompt *pr, int *n_soft_out,
                             GfError *err) {
    int64_t P = preprocess_max_patches(pre), D = 3 * (int64_t)pre->patch_size * pre->patch_size;
    int64_t n_real = 0, n_soft = 0, got = 0;
    int32_t *pos = gf_malloc((size_t)(P * 2) * sizeof *pos, err);
    float *pixels = pos ? gf_malloc((size_t)(P * D) * sizeof *pixels, err) : NULL;
    GfStatus st = pixels ? preprocess_image_f32(pre, img, pixels, pos, &n_real, &n_soft, err) : GF_NO_MEMORY;
    if (!st) {
        int64_t H = model_config(p->model)->text.hidden_size;
        st = model_vision_forward(p->model, pr->lora, pixels, pos, P, pr->soft + pr->n_soft * H, &got, err);
    }
    if (!st && got != n_soft)
        st = gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "the vision tower gave %lld soft tokens, preprocessing expected %lld",
                          (long long)got, (long long)n_soft);
    if (!st) {
        pr->n_soft += got;
        *n_soft_out = (int)got;
    }
    free(pos);
    free(pixels);
    return st;
}

GfStatus pipeline_prompt(Pipeline *p, const LoraBinding *lora, const ChatMessage *msgs, size_t n_msgs, const Image *images,
                         size_t n_images, int budget, int enable_thinking, Prompt *out, GfError *err) {
    memset(out, 0, sizeof *out);
    out->lora = lora;
    out->model = p->model;
    const GemmaConfig *cfg = model_config(p->model);
    if (n_images && !cfg->vision.present)
        return gf_error_set(err, GF_INVALID, "no_vision_tower", "image", "this model has no vision tower; it cannot take images");
    PreprocessConfig pre = p->pre;
    if (budget) pre.max_soft_tokens = budget;
    int *counts = n_images ? gf_calloc(n_images, sizeof *counts, err) : NULL;
    if (n_images && !counts) return GF_NO_MEMORY;
    int64_t H = cfg->text.hidden_size;
    GfStatus st = GF_OK;
    if (n_images) {
        st = model_device_alloc(p->model, &out->soft_buf, (size_t)((int64_t)n_images * pre.max_soft_tokens * H) * sizeof(float),
                                "soft tokens", err);
        out->soft = out->soft_buf.data;
    }
    for (size_t k = 0; !st && k < n_images; k++) {
        st = encode_image(p, &images[k], &pre, out, &counts[k], err);
        if (st) snprintf(err->param, sizeof err->param, "image[%zu]", k);
    }
    ChatTokens ct = {0};
    if (!st)
        st = chat_encode(&p->tpl, p->tok, msgs, n_msgs, counts, n_images, 1, enable_thinking, cfg->boi_token_id,
                         cfg->image_token_id, cfg->eoi_token_id, 0, &ct, err);
    free(counts);
    if (st) {
        prompt_free(out);
        return st;
    }
    out->ids = ct.ids;
    out->mm_type = ct.mm_type;
    out->n = (int64_t)ct.n;
    return GF_OK;
}

/* ---- generation ------------------------------------------------------------- */

/* Decodes id and hands the text to the sink; 1 when the sink asks to stop. */
static int emit(Pipeline *p, TokenStream *ts, int32_t id, TextSink sink, void *user, char **buf, size_t *cap,
                GfStatus *st, GfError *err) {
    size_t len = 0;
    *st = id < 0 ? tokenizer_stream_end(p->tok, ts, buf, &len, cap, err)
                 : tokenizer_stream_push(p->tok, ts, id, 1, buf, &len, cap, err);
    return !*st && sink && len && sink(user, *buf, len);
}

/* One generation's state, for the per-token callback. */
typedef struct {
    Pipeline *p;
    GenResult *res;
    TokenStream ts;
    TextSink sink;
    void *user;
    char *buf;
    size_t cap;
    double t0, t1;             /* start, and the first token (the end of the prefill) */
    GfStatus st;
    GfError *err;
} GenRun;

/* Each generated token: the end of the answer, or its text to the sink. */
static int on_token(void *user, int32_t id) {
    GenRun *g = user;
    if (!g->t1) g->t1 = gf_time_mono();
    if (model_is_eos(g->p->model, id)) {
        g->res->finish = FINISH_STOP;
        return 1;
    }
    if (g->res->ids) g->res->ids[g->res->n_generated] = id;
    g->res->n_generated++;
    if (emit(g->p, &g->ts, id, g->sink, g->user, &g->buf, &g->cap, &g->st, g->err)) {
        g->res->finish = FINISH_CANCELLED;
        return 1;
    }
    return g->st != GF_OK;
}

GfStatus pipeline_generate(Pipeline *p, const Prompt *pr, int64_t max_new, TextSink sink, void *user, GenResult *res,
                           GfError *err) {
    int32_t *ids_out = res->ids;
    memset(res, 0, sizeof *res);
    res->ids = ids_out;
    res->n_prompt = pr->n;
    res->finish = FINISH_LENGTH;
    GenRun g = {.p = p, .res = res, .sink = sink, .user = user, .t0 = gf_time_mono(), .err = err};
    ModelInput in = {.ids = pr->ids, .mm_type = pr->mm_type, .soft_tokens = pr->soft, .n = pr->n, .lora = pr->lora};
    KnSampleRow greedy = {0};
    int64_t n = 0;
    GfStatus st = model_generate(p->model, &in, max_new, &greedy, on_token, &g, &n, err);
    if (!st) st = g.st;
    if (!g.t1) g.t1 = gf_time_mono();
    res->prefill_s = g.t1 - g.t0;
    GfStatus st_end = GF_OK;
    if (!st && res->finish != FINISH_CANCELLED) emit(p, &g.ts, -1, sink, user, &g.buf, &g.cap, &st_end, err);
    tokenizer_stream_free(&g.ts);
    res->decode_s = gf_time_mono() - g.t1;
    free(g.buf);
    return st ? st : st_end;
}
