/* trainset.c - JSONL conversations to training sequences. */
#define _POSIX_C_SOURCE 200809L
#include "trainset.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dataset.h"
#include "jsoncheck.h"
#include "tar.h"

#define TS_MAX_IMAGES 64       /* per example; the backward's bound */
#define TS_MAX_LINE (64u << 20)

typedef struct {
    uint64_t offset, len;      /* the line's bytes in the JSONL */
    uint64_t line;             /* 1-based */
    int64_t tok0, n;           /* slice of the token pools */
    int64_t targets;
    int n_images;
} Entry;

struct TrainSet {
    const Pipeline *p;
    int fd;                    /* the JSONL, for re-reading lines */
    TarIndex tar;
    int has_tar;
    ImageLimits lim;
    Entry *e;
    size_t n, cap;
    int32_t *ids, *labels;
    uint8_t *mm;
    int64_t pool_n, pool_cap;
    int64_t max_tokens;
    TrainSetStats *stats;      /* measuring (trainset_measure): no example is kept */
    TrainSetImages images;
    DatasetReport *report;
    size_t max_issues;
};

/* One parsed line: messages whose parts point into root. */
typedef struct {
    cJSON *root;
    ChatMessage msgs[256];
    ChatPart *parts;           /* all messages' parts, images first per message */
    const char *refs[TS_MAX_IMAGES];
    size_t n_msgs;
    int n_images;
} Conversation;

static void conversation_free(Conversation *c) {
    cJSON_Delete(c->root);
    free(c->parts);
    memset(c, 0, sizeof *c);
}

/* ---- parsing ------------------------------------------------------------------ */

static GfStatus bad(GfError *err, uint64_t line, const char *what) {
    return gf_error_set(err, GF_UNPROCESSABLE, "invalid_dataset", "dataset", "line %llu: %s", (unsigned long long)line, what);
}

/* The error already in err, as a fault of dataset line `line` (running out
 * of memory or failing I/O keeps its status and code: not the data's fault). */
static GfStatus bad_line(GfError *err, uint64_t line) {
    if (err->status != GF_NO_MEMORY && err->status != GF_IO) {
        err->status = GF_UNPROCESSABLE;
        gf_strlcpy(err->code, "invalid_dataset", sizeof err->code);
    }
    return gf_error_wrap(err, "dataset", "line %llu", (unsigned long long)line);
}

static const char *image_ref(const cJSON *part) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(part, "image");
    if (cJSON_IsString(v)) return v->valuestring;
    v = cJSON_GetObjectItemCaseSensitive(part, "image_url");
    v = cJSON_IsObject(v) ? cJSON_GetObjectItemCaseSensitive(v, "url") : NULL;
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Appends the parts of one content list, images first. */
static GfStatus take_parts(Conversation *c, const cJSON *content, size_t *np, uint64_t line, GfError *err) {
    for (int pass = 0; pass < 2; pass++)
        for (const cJSON *p = content->child; p; p = p->next) {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
            if (!cJSON_IsString(type)) return bad(err, line, "a content part has no type");
            int is_image = strcmp(type->valuestring, "text") != 0;
            if (is_image != (pass == 0)) continue;
            if (is_image) {
                const char *ref = image_ref(p);
                if (!ref) return bad(err, line, "an image part has no image");
                if (c->n_images == TS_MAX_IMAGES) return bad(err, line, "too many images");
                c->refs[c->n_images++] = ref;
                c->parts[(*np)++] = (ChatPart){.is_image = 1};
            } else {
                const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "text");
                if (!cJSON_IsString(t)) return bad(err, line, "a text part has no text");
                c->parts[(*np)++] = (ChatPart){.text = t->valuestring};
            }
        }
    return GF_OK;
}

static GfStatus parse_message(Conversation *c, const cJSON *m, size_t *np, uint64_t line, GfError *err) {
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role"), *content = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (!cJSON_IsString(role) || !content) return bad(err, line, "a message has no role or content");
    ChatMessage *msg = &c->msgs[c->n_msgs++];
    const char *r = role->valuestring;
    msg->role = strcmp(r, "system") == 0 ? CHAT_SYSTEM : strcmp(r, "user") == 0 ? CHAT_USER : CHAT_ASSISTANT;
    if (msg->role == CHAT_ASSISTANT && strcmp(r, "assistant") != 0) return bad(err, line, "unknown role");
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(m, "weight");
    msg->untrained = msg->role == CHAT_ASSISTANT && cJSON_IsNumber(w) && w->valuedouble == 0;
    msg->parts = c->parts + *np;
    size_t first = *np;
    if (cJSON_IsString(content)) {
        c->parts[(*np)++] = (ChatPart){.text = content->valuestring};
        msg->content_is_string = 1;
    } else if (!cJSON_IsArray(content) || take_parts(c, content, np, line, err)) {
        return err->status ? err->status : bad(err, line, "content must be a string or a list of parts");
    }
    msg->n_parts = *np - first;
    return GF_OK;
}

static GfStatus parse_conversation(const char *text, size_t len, uint64_t line, Conversation *c, GfError *err) {
    memset(c, 0, sizeof *c);
    gf_error_clear(err);
    GfError jerr;
    c->root = json_parse_strict(text, len, "line", &jerr);
    if (!c->root) return bad(err, line, jerr.message);
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c->root, "messages");
    int n = cJSON_IsArray(msgs) ? cJSON_GetArraySize(msgs) : 0;
    if (n <= 0 || n > (int)(sizeof c->msgs / sizeof *c->msgs)) return bad(err, line, "'messages' must be a list of 1 to 256 messages");
    size_t total = 0, np = 0;
    for (const cJSON *m = msgs->child; m; m = m->next) {
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        total += cJSON_IsArray(content) ? (size_t)cJSON_GetArraySize(content) : 1;
    }
    if (!(c->parts = gf_calloc(total ? total : 1, sizeof *c->parts, err))) return GF_NO_MEMORY;
    for (const cJSON *m = msgs->child; m; m = m->next)
        if (!cJSON_IsObject(m) || parse_message(c, m, &np, line, err)) return err->status ? err->status : bad(err, line, "a message is not an object");
    return GF_OK;
}

/* ---- images ------------------------------------------------------------------- */

/* The archive member an image reference that is not a data: URL names;
 * -1 (err set) when it names none. */
static long archived_image(const TrainSet *t, const char *ref, GfError *err) {
    char name[TAR_NAME_MAX + 2];
    if (strstr(ref, "://") || strlen(ref) > TAR_NAME_MAX) {
        gf_error_set(err, GF_UNPROCESSABLE, "unknown_image_reference", NULL, "image '%.80s' is not an archive path", ref);
        return -1;
    }
    strcpy(name, ref);
    long i = (!t->has_tar || tar_name_normalize(name)) ? -1 : tar_find(&t->tar, name);
    if (i < 0)
        gf_error_set(err, GF_UNPROCESSABLE, "unknown_image_reference", NULL, "image '%.80s' is not in the images archive", ref);
    return i;
}

static GfStatus read_image_bytes(TrainSet *t, const char *ref, uint8_t **bytes, size_t *n, GfError *err) {
    if (strncmp(ref, "data:", 5) == 0) {
        const char *mime;
        size_t mime_len;
        return data_url_decode(ref, &mime, &mime_len, bytes, n, t->lim.max_bytes, err);
    }
    long i = archived_image(t, ref, err);
    if (i < 0) return err->status;
    *n = (size_t)t->tar.members[i].size;
    return tar_read_member(&t->tar, (size_t)i, t->lim.max_bytes, bytes, err);
}

/* st, err's message prefixed with the image it is about (a decode or probe error). */
static GfStatus image_failed(GfStatus st, GfError *err, const char *ref) {
    if (st) gf_error_wrap(err, NULL, "image '%.80s'", ref);
    return st;
}

/* Bytes of an archived image read first to probe its headers: the whole
 * image only when they do not hold them all (image_headers_within), so
 * opening a set of large validated images reads a little of each. */
#define PROBE_PREFIX (64u << 10)

/* An archived image's width and height from the first PROBE_PREFIX bytes
 * of member i: 1 when those answered, *st the read's or the probe's
 * status; 0, nothing set, when the image is no longer than them, over the
 * byte cap, or they do not hold every header (the whole read then decides
 * and says why). */
static int probe_prefix(TrainSet *t, long i, const char *ref, int *w, int *h, GfStatus *st, GfError *err) {
    uint64_t size = t->tar.members[i].size;
    if (size <= PROBE_PREFIX || size > t->lim.max_bytes) return 0;
    uint8_t *bytes = NULL;
    size_t n = 0;
    if ((*st = tar_read_prefix(&t->tar, (size_t)i, PROBE_PREFIX, &bytes, &n, err))) return 1;
    int within = image_headers_within(bytes, n);
    if (within) *st = image_failed(image_probe(bytes, n, &t->lim, w, h, err), err, ref);
    free(bytes);
    return within;
}

/* An archived image's probe from the whole of member i. */
static GfStatus probe_member(TrainSet *t, long i, const char *ref, int *w, int *h, GfError *err) {
    uint8_t *bytes = NULL;
    size_t n = (size_t)t->tar.members[i].size;
    GfStatus st = tar_read_member(&t->tar, (size_t)i, t->lim.max_bytes, &bytes, err);
    if (!st) st = image_failed(image_probe(bytes, n, &t->lim, w, h, err), err, ref);
    free(bytes);
    return st;
}

/* img is empty (image_free-able) whatever happens, the read failing too. */
static GfStatus load_image(TrainSet *t, const char *ref, Image *img, GfError *err) {
    memset(img, 0, sizeof *img);
    uint8_t *bytes = NULL;
    size_t n = 0;
    GfStatus st = read_image_bytes(t, ref, &bytes, &n, err);
    if (!st) st = image_failed(image_decode(bytes, n, &t->lim, img, err), err, ref);
    free(bytes);
    return st;
}

/* The soft-token count of a width x height image at the processor's budget. */
static GfStatus soft_count(const TrainSet *t, int width, int height, int *count, GfError *err) {
    const PreprocessConfig *pre = &t->p->pre;
    int tw, th;
    GfStatus st = preprocess_target_size(pre, width, height, &tw, &th, err);
    int side = pre->patch_size * pre->pooling_kernel;
    if (!st) *count = (tw / side) * (th / side);
    return st;
}

/* The soft-token count of image ref, from its headers or decoded (t->images). */
static GfStatus image_soft_count(TrainSet *t, const char *ref, int *count, GfError *err) {
    uint8_t *bytes = NULL;
    size_t n = 0;
    int w = 0, h = 0;
    GfStatus st = GF_OK;
    if (t->images == TRAINSET_IMAGES_VALIDATED && strncmp(ref, "data:", 5) != 0) {
        long member = archived_image(t, ref, err);
        if (member < 0) return err->status;
        if (!probe_prefix(t, member, ref, &w, &h, &st, err)) st = probe_member(t, member, ref, &w, &h, err);
    } else if (t->images == TRAINSET_IMAGES_VALIDATED) {
        st = read_image_bytes(t, ref, &bytes, &n, err);
        if (!st) st = image_failed(image_probe(bytes, n, &t->lim, &w, &h, err), err, ref);
        free(bytes);
    } else {
        Image img;
        st = load_image(t, ref, &img, err);
        w = img.width;
        h = img.height;
        image_free(&img);
    }
    return st ? st : soft_count(t, w, h, count, err);
}

/* ---- encoding ----------------------------------------------------------------- */

static GfStatus pool_append(TrainSet *t, const ChatTokens *ct, GfError *err) {
    if (t->pool_n + (int64_t)ct->n > t->pool_cap) {
        int64_t cap = t->pool_cap ? t->pool_cap : 4096;
        while (cap < t->pool_n + (int64_t)ct->n) cap *= 2;
        int32_t *ids = gf_realloc(t->ids, (size_t)cap * sizeof *ids, NULL);
        if (ids) t->ids = ids;
        int32_t *labels = ids ? gf_realloc(t->labels, (size_t)cap * sizeof *labels, NULL) : NULL;
        if (labels) t->labels = labels;
        uint8_t *mm = labels ? gf_realloc(t->mm, (size_t)cap, NULL) : NULL;
        if (!mm) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory holding the dataset's tokens");
        t->mm = mm;
        t->pool_cap = cap;
    }
    memcpy(t->ids + t->pool_n, ct->ids, ct->n * sizeof *t->ids);
    memcpy(t->labels + t->pool_n, ct->labels, ct->n * sizeof *t->labels);
    memcpy(t->mm + t->pool_n, ct->mm_type, ct->n);
    t->pool_n += (int64_t)ct->n;
    return GF_OK;
}

static int64_t count_targets(const int32_t *labels, int64_t n) {
    int64_t k = 0;
    for (int64_t i = 1; i < n; i++) k += labels[i] != -100;
    return k;
}

/* A conversation of n tokens over max_seq_len: measuring an upload (stats),
 * over what any job can train on (the file is at fault); opening a set for
 * a job, over that job's max_seq_len (the line is named). */
static GfStatus too_long(const TrainSet *t, const Entry *e, size_t n, int64_t max_seq_len, GfError *err) {
    if (t->stats)
        return gf_error_set(err, GF_UNPROCESSABLE, "sequence_too_long", "file",
                            "the conversation is %zu tokens, over the %lld that a job can train on: shorten it or split it",
                            n, (long long)max_seq_len);
    return gf_error_set(err, GF_UNPROCESSABLE, "sequence_too_long", "max_seq_len",
                        "line %llu is %zu tokens, over max_seq_len %lld: raise max_seq_len or shorten the conversation",
                        (unsigned long long)e->line, n, (long long)max_seq_len);
}

static GfStatus encode_line(TrainSet *t, Conversation *c, Entry *e, int64_t max_seq_len, GfError *err) {
    int counts[TS_MAX_IMAGES];
    for (int k = 0; k < c->n_images; k++)
        if (image_soft_count(t, c->refs[k], &counts[k], err)) return bad_line(err, e->line);
    const GemmaConfig *cfg = model_config(t->p->model);
    if (c->n_images && !cfg->vision.present) return bad(err, e->line, "the conversation has images but the model has no vision tower");
    ChatTokens ct = {0};
    if (chat_encode(&t->p->tpl, t->p->tok, c->msgs, c->n_msgs, counts, (size_t)c->n_images, 0, 0, cfg->boi_token_id,
                    cfg->image_token_id, cfg->eoi_token_id, CHAT_LABELS_TRAIN, &ct, err))
        return bad_line(err, e->line);
    GfStatus st = (int64_t)ct.n > max_seq_len ? too_long(t, e, ct.n, max_seq_len, err) : GF_OK;
    e->tok0 = t->pool_n;
    e->n = (int64_t)ct.n;
    e->n_images = c->n_images;
    e->targets = count_targets(ct.labels, e->n);
    if (!st && e->targets == 0) st = bad(err, e->line, "no token is trained (the assistant turns are empty or have weight 0)");
    if (!st && !t->stats) st = pool_append(t, &ct, err);
    chat_tokens_free(&ct);
    if (!st && e->n > t->max_tokens) t->max_tokens = e->n;
    return st;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r') return 0;
    return 1;
}

/* Strips the CR of a CRLF line end and a leading UTF-8 byte-order mark. */
static const char *line_body(const char *s, size_t *n, uint64_t line, uint64_t *skip) {
    *skip = 0;
    if (*n && s[*n - 1] == '\r') (*n)--;
    if (line == 1 && *n >= 3 && memcmp(s, "\xEF\xBB\xBF", 3) == 0) {
        *skip = 3;
        *n -= 3;
    }
    return s + *skip;
}

/* Measuring: the example counted, or the line's problem reported and the
 * reading going on (running out of memory or failing I/O still stops it). */
static GfStatus measured(TrainSet *t, const Entry *e, GfStatus st, GfError *err) {
    TrainSetStats *s = t->stats;
    if (!st) {
        s->examples++;
        s->tokens += e->n;
        if (e->n > s->max_tokens) {
            s->max_tokens = e->n;
            s->max_tokens_line = e->line;
        }
        return GF_OK;
    }
    if (st != GF_UNPROCESSABLE) return st;
    if (dataset_report_add(t->report, e->line, err->code, err->message, t->max_issues))
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory listing the dataset's problems");
    gf_error_clear(err);
    return GF_OK;
}

static GfStatus add_line(TrainSet *t, const char *s, size_t n, uint64_t offset, uint64_t line, int64_t max_seq_len,
                         GfError *err) {
    uint64_t skip;
    s = line_body(s, &n, line, &skip);
    if (is_blank(s, n)) return GF_OK;
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 256;
        Entry *e = gf_realloc(t->e, cap * sizeof *e, NULL);
        if (!e) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory reading the dataset");
        t->e = e;
        t->cap = cap;
    }
    Entry *e = &t->e[t->n];
    *e = (Entry){.offset = offset + skip, .len = n, .line = line};
    Conversation c;
    GfStatus st = parse_conversation(s, n, line, &c, err);
    if (!st) st = encode_line(t, &c, e, max_seq_len, err);
    conversation_free(&c);
    if (t->stats) return measured(t, e, st, err);
    if (!st) t->n++;
    return st;
}

static GfStatus read_lines(TrainSet *t, FILE *f, int64_t max_seq_len, GfError *err) {
    char *buf = NULL;
    size_t cap = 0;
    uint64_t offset = 0, line = 0;
    GfStatus st = GF_OK;
    for (;;) {
        errno = 0;
        ssize_t len = getline(&buf, &cap, f);
        if (len < 0) {
            if (errno) st = gf_error_set(err, GF_IO, "io_error", NULL, "cannot read the dataset: %s", strerror(errno));
            break;
        }
        line++;
        if ((size_t)len > TS_MAX_LINE) { st = bad(err, line, "the line is too long"); break; }
        size_t n = (size_t)len - (buf[len - 1] == '\n');
        if ((st = add_line(t, buf, n, offset, line, max_seq_len, err))) break;
        offset += (uint64_t)len;
    }
    free(buf);
    if (!st && t->n == 0 && !t->stats)
        st = gf_error_set(err, GF_UNPROCESSABLE, "empty_dataset", "dataset", "the dataset has no examples");
    return st;
}

/* The set read from jsonl (and tar): opened, or only measured into stats. */
static GfStatus read_set(const Pipeline *p, const char *jsonl, const char *tar, int64_t max_seq_len,
                         const ImageLimits *lim, TrainSetImages images, TrainSetStats *stats, DatasetReport *report,
                         size_t max_issues, TrainSet **out, GfError *err) {
    *out = NULL;
    TrainSet *t = gf_calloc(1, sizeof *t, err);
    if (!t) return GF_NO_MEMORY;
    t->p = p;
    t->lim = *lim;
    t->tar.fd = -1;
    t->stats = stats;
    t->images = images;
    t->report = report;
    t->max_issues = max_issues;
    GfStatus st = GF_OK;
    if (tar && !(st = tar_index_open(tar, 1000000, &t->tar, err))) t->has_tar = 1;
    FILE *f = st ? NULL : fopen(jsonl, "re");
    if (!st && !f) st = gf_error_set(err, GF_IO, "io_error", "dataset", "cannot open the dataset: %s", strerror(errno));
    if (!st) st = read_lines(t, f, max_seq_len, err);
    if (f) {
        t->fd = dup(fileno(f));
        fclose(f);
        if (!st && t->fd < 0) st = gf_error_set(err, GF_IO, "io_error", NULL, "cannot keep the dataset open: %s", strerror(errno));
    } else {
        t->fd = -1;
    }
    if (st) {
        trainset_close(t);
        return st;
    }
    *out = t;
    return GF_OK;
}

GfStatus trainset_open(const Pipeline *p, const char *jsonl, const char *tar, int64_t max_seq_len,
                       const ImageLimits *lim, TrainSetImages images, TrainSet **out, GfError *err) {
    return read_set(p, jsonl, tar, max_seq_len, lim, images, NULL, NULL, 0, out, err);
}

GfStatus trainset_measure(const Pipeline *p, const char *jsonl, const char *tar, int64_t max_seq_len,
                          const ImageLimits *lim, size_t max_issues, TrainSetStats *stats, DatasetReport *report,
                          GfError *err) {
    memset(stats, 0, sizeof *stats);
    memset(report, 0, sizeof *report);
    TrainSet *t;
    GfStatus st = read_set(p, jsonl, tar, max_seq_len, lim, TRAINSET_IMAGES_VALIDATED, stats, report, max_issues, &t, err);
    trainset_close(t);
    if (!st && report->n_bad_lines)
        st = gf_error_set(err, GF_UNPROCESSABLE, "invalid_dataset", "file", "%llu of %llu lines cannot be trained on; see error.details",
                          (unsigned long long)report->n_bad_lines, (unsigned long long)(stats->examples + report->n_bad_lines));
    return st;
}

void trainset_close(TrainSet *t) {
    if (!t) return;
    if (t->fd >= 0) close(t->fd);
    if (t->has_tar) tar_index_close(&t->tar);
    free(t->e);
    free(t->ids);
    free(t->labels);
    free(t->mm);
    free(t);
}

size_t trainset_count(const TrainSet *t) { return t->n; }
int64_t trainset_tokens(const TrainSet *t, size_t i) { return t->e[i].n; }
int64_t trainset_max_tokens(const TrainSet *t) { return t->max_tokens; }
int64_t trainset_targets(const TrainSet *t, size_t i) { return t->e[i].targets; }
uint64_t trainset_line(const TrainSet *t, size_t i) { return t->e[i].line; }

void trainset_tokens_of(const TrainSet *t, size_t i, const int32_t **ids, const int32_t **labels, int64_t *n) {
    *ids = t->ids + t->e[i].tok0;
    *labels = t->labels + t->e[i].tok0;
    *n = t->e[i].n;
}

/* ---- fetching ----------------------------------------------------------------- */

void train_example_free(TrainExample *ex) {
    if (!ex) return;
    free(ex->pixels);
    free(ex->positions);
    memset(ex, 0, sizeof *ex);
}

static GfStatus read_line_at(const TrainSet *t, const Entry *e, char **text, GfError *err) {
    char *s = gf_malloc(e->len + 1, err);
    if (!s) return GF_NO_MEMORY;
    size_t got = 0;
    while (got < e->len) {
        ssize_t r = pread(t->fd, s + got, e->len - got, (off_t)(e->offset + got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            free(s);
            return gf_error_set(err, GF_IO, "io_error", NULL, "cannot re-read line %llu of the dataset", (unsigned long long)e->line);
        }
        got += (size_t)r;
    }
    s[e->len] = '\0';
    *text = s;
    return GF_OK;
}

/* Decodes and preprocesses image k into the example's k-th pixel block. */
static GfStatus fetch_image(TrainSet *t, const char *ref, TrainExample *ex, int k, GfError *err) {
    const PreprocessConfig *pre = &t->p->pre;
    int64_t P = ex->seq.n_patches, D = 3 * (int64_t)pre->patch_size * pre->patch_size, n_real, n_soft;
    Image img;
    GfStatus st = load_image(t, ref, &img, err);
    if (!st) st = preprocess_image_f32(pre, &img, ex->pixels + k * P * D, ex->positions + k * P * 2, &n_real, &n_soft, err);
    image_free(&img);
    return st;
}

static GfStatus fetch_images(TrainSet *t, const Entry *e, TrainExample *ex, GfError *err) {
    const PreprocessConfig *pre = &t->p->pre;
    int64_t P = preprocess_max_patches(pre), D = 3 * (int64_t)pre->patch_size * pre->patch_size;
    char *text = NULL;
    Conversation c = {0};
    GfStatus st = read_line_at(t, e, &text, err);
    if (!st) st = parse_conversation(text, e->len, e->line, &c, err);
    if (!st && c.n_images != e->n_images) st = bad(err, e->line, "the dataset changed on disk while training");
    ex->seq.n_patches = P;
    size_t np = (size_t)(e->n_images * P * D), nq = (size_t)(e->n_images * P * 2);
    if (!st && np > ex->pixels_cap) { /* the example's buffers grow to the most images seen, then stay */
        float *px = gf_realloc(ex->pixels, np * sizeof *px, err);
        if (px) ex->pixels = px, ex->pixels_cap = np;
        else st = GF_NO_MEMORY;
    }
    if (!st && nq > ex->positions_cap) {
        int32_t *pq = gf_realloc(ex->positions, nq * sizeof *pq, err);
        if (pq) ex->positions = pq, ex->positions_cap = nq;
        else st = GF_NO_MEMORY;
    }
    for (int k = 0; !st && k < e->n_images; k++)
        if ((st = fetch_image(t, c.refs[k], ex, k, err))) st = bad_line(err, e->line);
    free(text);
    conversation_free(&c);
    return st;
}

GfStatus trainset_example(TrainSet *t, size_t i, TrainExample *ex, GfError *err) {
    TrainExample keep = *ex; /* its buffers, reused */
    memset(ex, 0, sizeof *ex);
    ex->pixels = keep.pixels;
    ex->positions = keep.positions;
    ex->pixels_cap = keep.pixels_cap;
    ex->positions_cap = keep.positions_cap;
    const Entry *e = &t->e[i];
    ex->line = e->line;
    ex->seq = (TrainSequence){.ids = t->ids + e->tok0, .labels = t->labels + e->tok0, .mm_type = t->mm + e->tok0,
                              .n = e->n, .n_images = e->n_images};
    if (e->n_images == 0) return GF_OK;
    GfStatus st = fetch_images(t, e, ex, err);
    if (st) return st;
    ex->seq.pixels = ex->pixels;
    ex->seq.positions = ex->positions;
    return GF_OK;
}
