/* inference.c - an inference request's life between an HTTP connection and
 * the serving engine, and the request pieces chat completions and /v1/infer
 * share (model resolution, images, chat encoding). The engine's sink only
 * records token ids; detokenizing, stop strings and the JSON of the reply
 * happen here on the connection's thread, when the engine's wake resumes it. */
#include "inference.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "image.h"
#include "reply.h"
#include "sha256.h"
#include "tokenizer.h"

typedef struct {
    pthread_mutex_t mu;
    int refs;                      /* engine (until SERVE_END) + connection (until abandon) */
    void (*wake)(void *);
    void *wake_cls;
    ServeReq *req;
    const Tokenizer *tok;
    TokenStream ts;
    InferOptions o;
    char id[48];
    int64_t created;
    /* generated ids, appended by the engine's sink; turned into text on the
     * connection's side (n_done of them so far) */
    int32_t *ids;
    size_t n_ids, ids_cap, n_done;
    int finalized;                     /* the end is formatted */
    int64_t counted;                   /* ids taken into the text before a stop string */
    /* generated text */
    char *text;
    size_t text_len, text_cap, sent;   /* bytes already streamed */
    size_t max_stop;                   /* longest stop string */
    /* stream bytes ready for the connection */
    char *out;
    size_t out_len, out_cap, out_pos;
    int started, ended, stopped, role_sent;
    FinishReason finish;
    GfError error;
    int has_error;
    int64_t prompt_tokens, completion_tokens;
} InferCall;

/* ---- small helpers ------------------------------------------------------------- */

void inference_options_free(InferOptions *o) {
    for (int i = 0; i < o->n_stop; i++) free(o->stop[i]);
    o->n_stop = 0;
}

static void call_unref(InferCall *c) {
    pthread_mutex_lock(&c->mu);
    int last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (!last) return;
    tokenizer_stream_free(&c->ts);
    inference_options_free(&c->o);
    free(c->text);
    free(c->ids);
    free(c->out);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static int out_append(InferCall *c, const char *s, size_t n) {
    if (c->out_len + n + 1 > c->out_cap) {
        size_t cap = (c->out_len + n + 1) * 2;
        char *b = realloc(c->out, cap);
        if (!b) return -1;
        c->out = b;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
    return 0;
}

/* "data: <json>\n\n" */
static void out_event(InferCall *c, cJSON *j) {
    char *s = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (!s) return;
    out_append(c, "data: ", 6);
    out_append(c, s, strlen(s));
    out_append(c, "\n\n", 2);
    free(s);
}

static const char *finish_name(const InferCall *c) {
    if (c->stopped) return "stop";
    return c->finish == FINISH_LENGTH ? "length" : "stop";
}

static cJSON *usage_json(const InferCall *c) {
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)c->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)c->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(c->prompt_tokens + c->completion_tokens));
    return u;
}

/* A chat.completion.chunk with delta text (or role), or the finish. */
static cJSON *chunk(const InferCall *c, const char *text, size_t n, int first, const char *finish) {
    cJSON *o = cJSON_CreateObject(), *choices = cJSON_CreateArray(), *ch = cJSON_CreateObject(), *d = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", c->id);
    cJSON_AddStringToObject(o, "object", "chat.completion.chunk");
    cJSON_AddNumberToObject(o, "created", (double)c->created);
    cJSON_AddStringToObject(o, "model", c->o.model);
    cJSON_AddItemToObject(o, "choices", choices);
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", 0);
    cJSON_AddItemToObject(ch, "delta", d);
    if (first) cJSON_AddStringToObject(d, "role", "assistant");
    if (text) {
        char *t = strndup(text, n);
        cJSON_AddStringToObject(d, "content", t ? t : "");
        free(t);
    }
    if (finish) cJSON_AddStringToObject(ch, "finish_reason", finish);
    else cJSON_AddNullToObject(ch, "finish_reason");
    return o;
}

/* Length of the end of text that is an incomplete UTF-8 character. */
static size_t utf8_tail(const char *s, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char b = (unsigned char)s[n - k];
        if ((b & 0xC0) == 0x80) continue;
        size_t need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

/* ---- text, on the connection's side --------------------------------------------- */

/* Cuts the text at the first stop string; 1 when one matched. */
static int apply_stop(InferCall *c) {
    size_t from = c->sent > c->max_stop ? c->sent - c->max_stop : 0;
    for (int i = 0; i < c->o.n_stop; i++) {
        const char *hit = NULL;
        size_t sl = strlen(c->o.stop[i]);
        for (size_t k = from; !hit && k + sl <= c->text_len; k++)
            if (memcmp(c->text + k, c->o.stop[i], sl) == 0) hit = c->text + k;
        if (hit) {
            c->text_len = (size_t)(hit - c->text);
            return 1;
        }
    }
    return 0;
}

/* Streams the text that can no longer change. */
static void stream_text(InferCall *c, int final) {
    size_t hold = final ? 0 : (c->max_stop ? c->max_stop - 1 : 0);
    size_t upto = c->text_len > hold ? c->text_len - hold : 0;
    if (!final) upto -= utf8_tail(c->text, upto);
    if (upto <= c->sent) return;
    out_event(c, chunk(c, c->text + c->sent, upto - c->sent, 0, NULL));
    c->sent = upto;
}

static void stream_end(InferCall *c) {
    if (c->has_error) {
        cJSON *e = cJSON_CreateObject(), *o = cJSON_AddObjectToObject(e, "error");
        cJSON_AddStringToObject(o, "code", c->error.code[0] ? c->error.code : "server_error");
        cJSON_AddStringToObject(o, "message", c->error.message);
        out_event(c, e);
    } else {
        stream_text(c, 1);
        cJSON *f = chunk(c, NULL, 0, 0, finish_name(c));
        out_event(c, f);
        if (c->o.include_usage) {
            cJSON *u = chunk(c, NULL, 0, 0, NULL);
            cJSON_DeleteItemFromObject(u, "choices");
            cJSON_AddItemToObject(u, "choices", cJSON_CreateArray());
            cJSON_AddItemToObject(u, "usage", usage_json(c));
            out_event(c, u);
        }
    }
    out_append(c, "data: [DONE]\n\n", 14);
}

/* The engine's sink: it only records the event (no detokenizing, no
 * JSON on the engine thread) and wakes the connection. Nonzero once the
 * connection's side found a stop string: the engine ends the request at
 * this token. */
static int on_event(void *cls, const ServeEvent *ev) {
    InferCall *c = cls;
    pthread_mutex_lock(&c->mu);
    int stop = c->stopped;
    c->prompt_tokens = ev->prompt_tokens;
    if (ev->kind == SERVE_TOKEN && !stop) {
        if (c->n_ids == c->ids_cap) {
            size_t cap = c->ids_cap ? 2 * c->ids_cap : 64;
            int32_t *n = realloc(c->ids, cap * sizeof *n);
            if (n) {
                c->ids = n;
                c->ids_cap = cap;
            }
        }
        if (c->n_ids < c->ids_cap) c->ids[c->n_ids++] = ev->token;
        else stop = 1; /* out of memory: end here rather than drop tokens */
        c->completion_tokens = (int64_t)c->n_ids;
    } else if (ev->kind == SERVE_END) {
        c->finish = ev->finish;
        if (ev->error) {
            c->error = *ev->error;
            c->has_error = 1;
        }
        c->ended = 1;
    }
    c->started = 1;
    if (c->wake) c->wake(c->wake_cls);
    pthread_mutex_unlock(&c->mu);
    if (ev->kind == SERVE_END) call_unref(c);
    return stop;
}

/* Under mu, on the connection's side: the ids recorded since the last call
 * into text (stop strings applied, stream events formatted), and the end
 * once the engine has sent it. */
static void advance(InferCall *c) {
    GfError err;
    if (c->started && !c->role_sent && c->o.stream && c->o.chat) out_event(c, chunk(c, NULL, 0, 1, NULL));
    c->role_sent = c->started;
    for (; c->n_done < c->n_ids && !c->stopped; c->n_done++) {
        tokenizer_stream_push(c->tok, &c->ts, c->ids[c->n_done], 1, &c->text, &c->text_len, &c->text_cap, &err);
        c->counted++;
        c->stopped = apply_stop(c);
        if (c->o.stream) stream_text(c, 0);
    }
    if (!c->ended || c->finalized || (c->n_done < c->n_ids && !c->stopped)) return;
    if (!c->stopped) tokenizer_stream_end(c->tok, &c->ts, &c->text, &c->text_len, &c->text_cap, &err);
    if (!c->stopped) c->stopped = apply_stop(c);
    if (c->stopped) c->completion_tokens = c->counted; /* the tokens up to the stop string */
    c->finalized = 1;
    if (c->o.stream) stream_end(c);
}

/* ---- connection side ------------------------------------------------------------ */

static void call_arm(void *cls, void (*wake)(void *), void *wake_cls) {
    InferCall *c = cls;
    pthread_mutex_lock(&c->mu);
    c->wake = wake;
    c->wake_cls = wake_cls;
    pthread_mutex_unlock(&c->mu);
}

static ssize_t call_read(void *cls, uint64_t pos, char *buf, size_t max) {
    InferCall *c = cls;
    (void)pos;
    pthread_mutex_lock(&c->mu);
    advance(c);
    ssize_t n;
    if (c->out_pos < c->out_len) {
        n = (ssize_t)(c->out_len - c->out_pos < max ? c->out_len - c->out_pos : max);
        memcpy(buf, c->out + c->out_pos, (size_t)n);
        c->out_pos += (size_t)n;
    } else {
        n = c->finalized ? 0 : HTTP_STREAM_WAIT;
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

static cJSON *completion_json(const InferCall *c) {
    cJSON *o = cJSON_CreateObject();
    char *t = strndup(c->text ? c->text : "", c->text_len);
    if (!c->o.chat) {
        cJSON_AddStringToObject(o, "id", c->id);
        cJSON_AddStringToObject(o, "model", c->o.model);
        cJSON_AddStringToObject(o, "text", t ? t : "");
        cJSON_AddStringToObject(o, "finish_reason", finish_name(c));
        cJSON_AddItemToObject(o, "usage", usage_json(c));
        free(t);
        return o;
    }
    cJSON_AddStringToObject(o, "id", c->id);
    cJSON_AddStringToObject(o, "object", "chat.completion");
    cJSON_AddNumberToObject(o, "created", (double)c->created);
    cJSON_AddStringToObject(o, "model", c->o.model);
    cJSON *choices = cJSON_AddArrayToObject(o, "choices"), *ch = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", 0);
    cJSON *msg = cJSON_AddObjectToObject(ch, "message");
    cJSON_AddStringToObject(msg, "role", "assistant");
    cJSON_AddStringToObject(msg, "content", t ? t : "");
    cJSON_AddStringToObject(ch, "finish_reason", finish_name(c));
    cJSON_AddItemToObject(o, "usage", usage_json(c));
    free(t);
    return o;
}

static int call_take(void *cls, HttpResp *resp) {
    InferCall *c = cls;
    pthread_mutex_lock(&c->mu);
    if (!c->o.stream) advance(c);
    int ready = c->o.stream ? c->started : c->finalized;
    /* an error ends the answer as an error, even after some tokens (a
     * shutdown mid-answer): a cut answer never reads as complete */
    int failed = c->has_error && c->ended && (!c->o.stream || c->out_pos == 0);
    GfError e = c->error;
    cJSON *body = ready && !failed && !c->o.stream ? completion_json(c) : NULL;
    pthread_mutex_unlock(&c->mu);
    if (!ready) return 0;
    if (failed) {
        reply_error(resp, &e, NULL);
        if (resp->status == 503 || resp->status == 429) resp->retry_after = 1;
        return 1;
    }
    if (body) {
        reply_json(resp, 200, body);
        return 1;
    }
    reply_event_stream(resp, call_read, c);
    return 1;
}

static void call_abandon(void *cls) {
    InferCall *c = cls;
    pthread_mutex_lock(&c->mu);
    c->wake = NULL;
    pthread_mutex_unlock(&c->mu);
    serve_cancel(c->req);
    serve_release(c->req);
    call_unref(c);
}

GfStatus inference_start_or_reply(Api *api, ServeSubmit *s, InferOptions *opts, HttpResp *resp) {
    GfError err;
    InferCall *c = gf_calloc(1, sizeof *c, &err);
    if (!c) {
        inference_options_free(opts);
        serve_submit_free(s);
        return reply_error(resp, &err, NULL);
    }
    pthread_mutex_init(&c->mu, NULL);
    c->refs = 2;
    c->tok = api->serving.tok;
    c->o = *opts;
    opts->n_stop = 0;
    for (int i = 0; i < c->o.n_stop; i++)
        if (strlen(c->o.stop[i]) > c->max_stop) c->max_stop = strlen(c->o.stop[i]);
    uint8_t raw[12];
    char hex[25] = "000000000000000000000000";
    if (gf_random_bytes(raw, sizeof raw) == 0) gf_hex(raw, sizeof raw, hex);
    snprintf(c->id, sizeof c->id, "%s%s", c->o.chat ? "chatcmpl-" : "infer-", hex);
    c->created = gf_time_unix();
    snprintf(s->adapter, sizeof s->adapter, "%s", c->o.adapter);
    snprintf(s->adapter_dir, sizeof s->adapter_dir, "%s", c->o.adapter_dir);
    s->sink = on_event;
    s->sink_cls = c;
    if (serve_submit(api->serving.serve, s, &c->req, &err)) {
        c->refs = 1;
        call_unref(c);
        reply_error(resp, &err, NULL);
        if (err.status == GF_BUSY || err.status == GF_NOT_READY) resp->retry_after = 1;
        return err.status;
    }
    resp->deferred = (HttpDeferred){c, call_arm, call_take, call_abandon};
    return GF_OK;
}

/* ---- request pieces ------------------------------------------------------------- */

/* A checkpoint's model, "ft:<the job's adapter name>:<job id>:ckpt-step-<N>"
 * (its fine_tuned_model_checkpoint): the adapter saved in that checkpoint.
 * 1 when name has that form (opts set, or err), 0 when it has not. */
static int resolve_checkpoint(Api *api, const char *name, InferOptions *opts, GfError *err, GfStatus *st) {
    char adapter[101], job_id[STORE_ID_MAX], want[STORE_NAME_MAX];
    long long step = 0;
    int used = 0;
    if (strncmp(name, "ft:", 3) != 0 ||
        sscanf(name + 3, "%100[^:]:%39[^:]:ckpt-step-%lld%n", adapter, job_id, &step, &used) != 3 || name[3 + used])
        return 0;
    JobRow *job = malloc(sizeof *job);
    CheckpointRow *row = malloc(sizeof *row);
    *st = job && row ? GF_OK : gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    int found = 0;
    GfStatus got = *st ? *st : store_job_get(api->store, job_id, job, err);
    if (!got) {
        store_job_adapter_name(job, want, sizeof want);
        got = strcmp(want, adapter) == 0 ? store_job_checkpoint(api->store, job_id, step, row, err) : GF_NOT_FOUND;
        found = !got && row->dir[0];
    }
    if (!*st && got && got != GF_NOT_FOUND) *st = got; /* the store failed: say so, not "no such model" */
    if (!*st && !found)
        *st = gf_error_set(err, GF_NOT_FOUND, "model_not_found", "model",
                           "no checkpoint '%s' (GET /v1/fine_tuning/jobs/%s/checkpoints lists the ones kept)", name, job_id);
    if (!*st) {
        snprintf(opts->adapter, sizeof opts->adapter, "%s", name);
        snprintf(opts->adapter_dir, sizeof opts->adapter_dir, "%s", row->dir);
    }
    free(job);
    free(row);
    return 1;
}

GfStatus inference_resolve_model(Api *api, const char *name, InferOptions *opts, GfError *err) {
    snprintf(opts->model, sizeof opts->model, "%s", name);
    if (strcmp(name, api->model.id) == 0) {
        opts->adapter[0] = opts->adapter_dir[0] = '\0';
        return GF_OK;
    }
    GfStatus st;
    if (resolve_checkpoint(api, name, opts, err, &st)) return st;
    if (check_object_name(name, "model", err)) {
        snprintf(err->code, sizeof err->code, "invalid_model_name");
        return err->status;
    }
    char cfg[4096], weights[4096];
    AdapterRow row;
    if (store_adapter_get(api->store, name, &row, err)) {
        if (err->status == GF_NOT_FOUND)
            gf_error_set(err, GF_NOT_FOUND, "model_not_found", "model",
                         "no model or adapter named '%s' (GET /v1/models lists them)", name);
        return err->status;
    }
    if (store_adapter_files(api->store, name, cfg, weights, err)) return err->status;
    char *slash = strrchr(cfg, '/');
    if (slash) *slash = '\0';
    snprintf(opts->adapter, sizeof opts->adapter, "%s", name);
    snprintf(opts->adapter_dir, sizeof opts->adapter_dir, "%s", cfg);
    return GF_OK;
}

GfStatus inference_image(Api *api, const uint8_t *bytes, size_t n, ServeImage *out, GfError *err) {
    memset(out, 0, sizeof *out);
    if (n > api->limits.image_max_bytes)
        return gf_error_set(err, GF_TOO_LARGE, "image_too_large", "image", "the image is %zu bytes, over the %llu-byte limit",
                            n, (unsigned long long)api->limits.image_max_bytes);
    ImageLimits lim = {.max_bytes = api->limits.image_max_bytes, .max_pixels = api->limits.image_max_pixels};
    Image img = {0};
    if (image_decode(bytes, n, &lim, &img, err)) return err->status;
    const PreprocessConfig *pre = api->serving.pre;
    int64_t P = preprocess_max_patches(pre), D = 3 * (int64_t)pre->patch_size * pre->patch_size, n_real = 0, n_soft = 0;
    out->positions = gf_malloc((size_t)(P * 2) * sizeof(int32_t), err);
    out->pixels = out->positions ? gf_malloc((size_t)(P * D) * sizeof(float), err) : NULL;
    GfStatus st = out->pixels ? preprocess_image_f32(pre, &img, out->pixels, out->positions, &n_real, &n_soft, err)
                              : GF_NO_MEMORY;
    image_free(&img);
    if (st) {
        free(out->pixels);
        free(out->positions);
        memset(out, 0, sizeof *out);
        return st;
    }
    out->n_patches = P;
    out->n_soft = n_soft;
    gf_sha256(bytes, n, out->digest); /* the vision cache's key: the bytes decide the pixels */
    out->has_digest = 1;
    return GF_OK;
}

GfStatus inference_encode(Api *api, const ChatMessage *msgs, size_t n_msgs, ServeSubmit *s, GfError *err) {
    const ApiServing *sv = &api->serving;
    int counts[64];
    if (s->n_images > 64) return gf_error_set(err, GF_INVALID, "too_many_images", "messages", "too many images");
    for (int i = 0; i < s->n_images; i++) counts[i] = (int)s->images[i].n_soft;
    ChatTokens ct = {0};
    if (chat_encode(sv->tpl, sv->tok, msgs, n_msgs, counts, (size_t)s->n_images, 1, 0, sv->cfg->boi_token_id,
                    sv->cfg->image_token_id, sv->cfg->eoi_token_id, CHAT_LABELS_NONE, &ct, err))
        return err->status;
    s->ids = ct.ids;
    s->mm_type = ct.mm_type;
    s->n = (int64_t)ct.n;
    return GF_OK;
}
