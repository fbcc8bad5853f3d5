/* chat.c - Gemma 4 chat rendering and encoding. */
#include "chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsoncheck.h"

GfStatus chat_template_detect(const char *src, ChatTemplate *tpl, GfError *err) {
    memset(tpl, 0, sizeof *tpl);
    if (!strstr(src, "<|turn>"))
        return gf_error_set(err, GF_INVALID, "unsupported_template", NULL,
                            "the model's chat template is not a Gemma 4 template (no <|turn>)");
    /* in the Jinja source a newline is written as backslash-n */
    tpl->image_blank_lines = strstr(src, "\\n\\n<|image|>\\n\\n") != NULL;
    tpl->thought_in_gen_prompt = strstr(src, "<|channel>thought\\n<channel|>") != NULL;
    tpl->think_newline = strstr(src, "'<|think|>\\n'") != NULL;
    snprintf(tpl->bos, sizeof tpl->bos, "<bos>");
    return GF_OK;
}

GfStatus chat_template_load_dir(const char *dir, ChatTemplate *tpl, GfError *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    GfError ferr;
    char *src = gf_read_file(path, 1u << 20, "chat_template.jinja", NULL, &ferr);
    if (!src && ferr.status != GF_NOT_FOUND) return gf_error_set(err, ferr.status, ferr.code, NULL, "%s", ferr.message);
    if (src) {
        GfStatus st = chat_template_detect(src, tpl, err);
        free(src);
        return st;
    }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    char *cfg = gf_read_file(path, 8u << 20, "tokenizer_config.json", NULL, &ferr);
    GfError jerr;
    cJSON *j = cfg ? json_parse_strict(cfg, strlen(cfg), "tokenizer_config.json", &jerr) : NULL;
    free(cfg);
    const cJSON *t = j ? cJSON_GetObjectItemCaseSensitive(j, "chat_template") : NULL;
    GfStatus st = cJSON_IsString(t) ? chat_template_detect(t->valuestring, tpl, err)
                                    : gf_error_set(err, GF_NOT_FOUND, "file_not_found", NULL,
                                                   "the model directory has no chat template (chat_template.jinja)");
    cJSON_Delete(j);
    return st;
}

/* ---- text helpers -------------------------------------------------------------- */

typedef struct {
    char *s;
    size_t n, cap;
    int failed;
} Buf;

static void put(Buf *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *ns = gf_realloc(b->s, nc, NULL);
        if (!ns) { b->failed = 1; return; }
        b->s = ns;
        b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void puts_(Buf *b, const char *s) { put(b, s, strlen(s)); }

/* Length of the Python-whitespace character at s (0 when none). */
static size_t space_len(const unsigned char *s, size_t n) {
    if (n >= 1 && ((s[0] >= 0x09 && s[0] <= 0x0D) || (s[0] >= 0x1C && s[0] <= 0x20))) return 1;
    if (n >= 2 && s[0] == 0xC2 && (s[1] == 0x85 || s[1] == 0xA0)) return 2;
    if (n >= 3 && s[0] == 0xE1 && s[1] == 0x9A && s[2] == 0x80) return 3;                         /* U+1680 */
    if (n >= 3 && s[0] == 0xE2 && s[1] == 0x80 && (s[2] <= 0x8A || s[2] == 0xA8 || s[2] == 0xA9 || s[2] == 0xAF))
        return 3;                                                                                    /* U+2000-200A, 2028, 2029, 202F */
    if (n >= 3 && s[0] == 0xE2 && s[1] == 0x81 && s[2] == 0x9F) return 3;                         /* U+205F */
    if (n >= 3 && s[0] == 0xE3 && s[1] == 0x80 && s[2] == 0x80) return 3;                         /* U+3000 */
    return 0;
}

/* Python str.strip() on UTF-8: returns the [start, end) span. */
static void trim(const char *s, size_t n, size_t *start, size_t *end) {
    const unsigned char *u = (const unsigned char *)s;
    size_t a = 0, b = n, k;
    while (a < b && (k = space_len(u + a, b - a))) a += k;
    /* from the right: step back over whole characters */
    while (b > a) {
        size_t c = b - 1;
        while (c > a && (u[c] & 0xC0) == 0x80) c--;
        if (space_len(u + c, b - c) != b - c) break;
        b = c;
    }
    *start = a;
    *end = b;
}

static void put_trimmed(Buf *b, const char *s) {
    size_t a, e;
    trim(s, strlen(s), &a, &e);
    put(b, s + a, e - a);
}

/* Model text without thoughts: of each piece split at "<channel|>", the part
 * before its first "<|channel>"; concatenated, then trimmed. */
static void put_without_thoughts(Buf *b, const char *s) {
    Buf tmp = {0};
    const char *p = s;
    for (;;) {
        const char *close = strstr(p, "<channel|>");
        size_t len = close ? (size_t)(close - p) : strlen(p);
        const char *open = memmem(p, len, "<|channel>", 10);
        put(&tmp, p, open ? (size_t)(open - p) : len);
        if (!close) break;
        p = close + 10;
    }
    if (tmp.failed) b->failed = 1;
    else if (tmp.s) put_trimmed(b, tmp.s);
    free(tmp.s);
}

/* ---- rendering ----------------------------------------------------------------- */

static GfStatus check_messages(const ChatMessage *m, size_t n, GfError *err) {
    for (size_t i = 0; i < n; i++) {
        if (m[i].role == CHAT_SYSTEM && i != 0)
            return gf_error_set(err, GF_INVALID, "invalid_message", "messages", "a system message may only come first");
        if (m[i].role == CHAT_ASSISTANT && i > 0 && m[i - 1].role == CHAT_ASSISTANT)
            return gf_error_set(err, GF_INVALID, "invalid_message", "messages",
                                "two assistant messages in a row: roles must alternate (merge them into one)");
        for (size_t k = 0; k < m[i].n_parts; k++)
            if (m[i].parts[k].is_image && m[i].role != CHAT_USER)
                return gf_error_set(err, GF_INVALID, "image_in_assistant_message", "messages", "images are only allowed in user turns");
    }
    return GF_OK;
}

/* Calls emit for every piece of the rendering: text, or an image marker. */
typedef void (*Emit)(void *ctx, const char *text, size_t len, int image, int trained);

static void emit_str(Emit emit, void *ctx, const char *s, int trained) { emit(ctx, s, strlen(s), 0, trained); }

/* The empty thought block the 26B/31B templates end the generation prompt with. */
#define EMPTY_THOUGHT "<|channel>thought\n<channel|>"

/* train: every assistant turn starts with the prefix a generation prompt
 * would give it (the empty thought block where the template has one), so a
 * model trained on the sequence sees at each answer what inference sends. */
static void render(const ChatTemplate *tpl, const ChatMessage *m, size_t n, int gen, int think, int train, Emit emit,
                   void *ctx) {
    emit_str(emit, ctx, tpl->bos, 0);
    int sys = n > 0 && m[0].role == CHAT_SYSTEM;
    if (think || sys) {
        emit_str(emit, ctx, "<|turn>system\n", 0);
        if (think) emit_str(emit, ctx, tpl->think_newline ? "<|think|>\n" : "<|think|>", 0);
        Buf b = {0};
        for (size_t k = 0; sys && k < m[0].n_parts; k++) {
            put_trimmed(&b, m[0].parts[k].text);
            if (!m[0].content_is_string) puts_(&b, " ");
        }
        if (b.n) emit(ctx, b.s, b.n, 0, 0);
        free(b.s);
        emit_str(emit, ctx, "<turn|>\n", 0);
    }
    for (size_t i = sys ? 1 : 0; i < n; i++) {
        int model = m[i].role == CHAT_ASSISTANT, trained = model && !m[i].untrained;
        emit_str(emit, ctx, model ? "<|turn>model\n" : "<|turn>user\n", 0);
        if (model && train && tpl->thought_in_gen_prompt && !think) emit_str(emit, ctx, EMPTY_THOUGHT, 0);
        for (size_t k = 0; k < m[i].n_parts; k++) {
            if (m[i].parts[k].is_image) {
                if (tpl->image_blank_lines) emit_str(emit, ctx, "\n\n", 0);
                emit(ctx, "<|image|>", 9, 1, 0);
                if (tpl->image_blank_lines) emit_str(emit, ctx, "\n\n", 0);
                continue;
            }
            Buf b = {0};
            if (model) put_without_thoughts(&b, m[i].parts[k].text);
            else put_trimmed(&b, m[i].parts[k].text);
            if (b.n) emit(ctx, b.s, b.n, 0, trained);
            free(b.s);
        }
        emit_str(emit, ctx, "<turn|>", trained);
        emit_str(emit, ctx, "\n", 0);
    }
    if (gen) {
        emit_str(emit, ctx, "<|turn>model\n", 0);
        if (tpl->thought_in_gen_prompt && !think) emit_str(emit, ctx, EMPTY_THOUGHT, 0);
    }
}

static void emit_text(void *ctx, const char *text, size_t len, int image, int trained) {
    (void)image;
    (void)trained;
    put(ctx, text, len);
}

GfStatus chat_render(const ChatTemplate *tpl, const ChatMessage *msgs, size_t n, int gen, int think, char **text, GfError *err) {
    if (check_messages(msgs, n, err)) return GF_INVALID;
    Buf b = {0};
    render(tpl, msgs, n, gen, think, 0, emit_text, &b);
    if (b.failed) { free(b.s); return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory"); }
    *text = b.s;
    return GF_OK;
}

/* ---- encoding ------------------------------------------------------------------- */

typedef struct {
    const Tokenizer *tok;
    const int *soft;
    size_t n_images, image;
    int32_t boi, img, eoi;
    int with_labels;
    ChatTokens *out;
    size_t cap;
    GfError *err;
    int failed;
    /* pending text: consecutive text pieces are encoded together, as the
     * tokenizer would see the rendered string; labels follow each piece */
    Buf text;
    uint8_t *trained_bytes;   /* per byte of `text` */
    size_t trained_cap;
} Enc;

static void push(Enc *e, int32_t id, uint8_t mm, int32_t label) {
    if (e->failed) return;
    ChatTokens *o = e->out;
    if (o->n == e->cap) {
        size_t nc = e->cap ? e->cap * 2 : 256;
        int32_t *ids = gf_realloc(o->ids, nc * sizeof *ids, NULL), *labels = o->labels;
        uint8_t *mmt = ids ? gf_realloc(o->mm_type, nc, NULL) : NULL;
        if (ids) o->ids = ids;
        if (mmt) o->mm_type = mmt;
        if (e->with_labels && mmt && !(labels = gf_realloc(o->labels, nc * sizeof *labels, NULL))) mmt = NULL;
        if (!ids || !mmt) { e->failed = 1; return; }
        o->labels = labels;
        e->cap = nc;
    }
    o->ids[o->n] = id;
    o->mm_type[o->n] = mm;
    if (e->with_labels) o->labels[o->n] = label;
    o->n++;
}

/* Encodes the pending text. Pieces of different label state are encoded
 * separately: every trained piece starts at a turn boundary ("<|turn>model\n"
 * or a previous piece), where added tokens already split the text. */
static void flush(Enc *e) {
    if (!e->text.n || e->failed) { e->text.n = 0; return; }
    size_t start = 0;
    while (start < e->text.n) {
        size_t end = start;
        while (end < e->text.n && e->trained_bytes[end] == e->trained_bytes[start]) end++;
        int32_t *ids = NULL;
        size_t n_ids = 0;
        if (tokenizer_encode(e->tok, e->text.s + start, end - start, 0, 1, &ids, &n_ids, e->err)) { e->failed = 1; break; }
        for (size_t i = 0; i < n_ids; i++) push(e, ids[i], 0, e->trained_bytes[start] ? ids[i] : -100);
        free(ids);
        start = end;
    }
    e->text.n = 0;
}

static void emit_tokens(void *ctx, const char *text, size_t len, int image, int trained) {
    Enc *e = ctx;
    if (e->failed) return;
    if (!image) {
        if (e->text.n + len > e->trained_cap) {
            size_t nc = (e->text.n + len) * 2 + 64;
            uint8_t *t = gf_realloc(e->trained_bytes, nc, NULL);
            if (!t) { e->failed = 1; return; }
            e->trained_bytes = t;
            e->trained_cap = nc;
        }
        memset(e->trained_bytes + e->text.n, trained && e->with_labels, len);
        put(&e->text, text, len);
        return;
    }
    flush(e);
    if (e->image >= e->n_images) {
        gf_error_set(e->err, GF_INVALID, "invalid_request", "messages", "the conversation has more images than were given");
        e->failed = 1;
        return;
    }
    push(e, e->boi, 0, -100);
    for (int k = 0; k < e->soft[e->image]; k++) push(e, e->img, 1, -100);
    push(e, e->eoi, 0, -100);
    e->image++;
}

GfStatus chat_encode(const ChatTemplate *tpl, const Tokenizer *tok, const ChatMessage *msgs, size_t n, const int *soft,
                     size_t n_images, int gen, int think, int32_t boi, int32_t img, int32_t eoi, int with_labels,
                     ChatTokens *out, GfError *err) {
    memset(out, 0, sizeof *out);
    if (check_messages(msgs, n, err)) return GF_INVALID;
    Enc e = {tok, soft, n_images, 0, boi, img, eoi, with_labels, out, 0, err, 0, {0}, NULL, 0};
    render(tpl, msgs, n, gen, think, with_labels == CHAT_LABELS_TRAIN, emit_tokens, &e);
    flush(&e);
    free(e.text.s);
    free(e.trained_bytes);
    if (!e.failed && e.image != n_images)
        e.failed = gf_error_set(err, GF_INVALID, "invalid_request", "messages", "%zu images were given but the conversation places %zu",
                                n_images, e.image) != GF_OK;
    if (e.failed || e.text.failed) {
        if (err->status == GF_OK) gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
        chat_tokens_free(out);
        return err->status;
    }
    return GF_OK;
}

void chat_tokens_free(ChatTokens *t) {
    if (!t) return;
    free(t->ids);
    free(t->mm_type);
    free(t->labels);
    memset(t, 0, sizeof *t);
}
