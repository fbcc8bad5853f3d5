/* dataset.c - line-by-line JSONL validation with image resolution. */
#include "dataset.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "jsoncheck.h"
#include "pool.h"
#include "tar.h"

void dataset_limits_default(DatasetLimits *l) {
    l->max_line_bytes = 8u << 20;
    l->min_examples = 10;
    l->max_examples = 1000000;
    l->max_images_per_example = 10;
    l->max_archive_members = 100000;
    l->max_issues_kept = 1000;
    l->n_threads = 0;
    l->image.max_bytes = 20u << 20;
    l->image.max_pixels = 50000000;
}

void dataset_report_free(DatasetReport *r) {
    if (!r) return;
    free(r->issues);
    memset(r, 0, sizeof *r);
}

/* ---- base64 and data URLs --------------------------------------------- */

static int b64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

uint8_t *base64_decode_strict(const char *s, size_t n, size_t *out_len, GfError *err) {
    if (n == 0 || n % 4) {
        gf_error_set(err, GF_INVALID, "invalid_image", NULL, "base64 length is not a multiple of 4");
        return NULL;
    }
    size_t pad = s[n - 1] == '=' ? (s[n - 2] == '=' ? 2 : 1) : 0;
    uint8_t *out = gf_malloc(n / 4 * 3, err);
    if (!out) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4];
        for (int k = 0; k < 4; k++) {
            int last_group = i + 4 == n;
            if (last_group && s[i + k] == '=' && (size_t)k >= 4 - pad) { v[k] = 0; continue; }
            v[k] = b64_value((unsigned char)s[i + k]);
            if (v[k] < 0) {
                free(out);
                gf_error_set(err, GF_INVALID, "invalid_image", NULL, "invalid base64 character at offset %zu", i + (size_t)k);
                return NULL;
            }
        }
        uint32_t t = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        out[o++] = (uint8_t)(t >> 16);
        out[o++] = (uint8_t)(t >> 8);
        out[o++] = (uint8_t)t;
    }
    *out_len = o - pad;
    return out;
}

GfStatus data_url_decode(const char *url, const char **mime, size_t *mime_len, uint8_t **bytes,
                         size_t *n_bytes, uint64_t max_bytes, GfError *err) {
    if (strncmp(url, "data:", 5) != 0)
        return gf_error_set(err, GF_INVALID, "remote_images_not_supported", NULL,
                            "only inline data: URLs are accepted for images; the server fetches nothing");
    const char *p = url + 5, *comma = strchr(p, ',');
    if (!comma) return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "data URL has no ','");
    const char *semi = memchr(p, ';', (size_t)(comma - p));
    if (!semi || (size_t)(comma - semi) != 7 || strncmp(semi, ";base64", 7) != 0)
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "data URL must be ';base64' encoded");
    *mime = p;
    *mime_len = (size_t)(semi - p);
    size_t b64_len = strlen(comma + 1);
    if ((uint64_t)b64_len / 4 * 3 > max_bytes + 3)
        return gf_error_set(err, GF_TOO_LARGE, "image_too_large", NULL,
                            "inline image is over the cap of %llu bytes", (unsigned long long)max_bytes);
    *bytes = base64_decode_strict(comma + 1, b64_len, n_bytes, err);
    return *bytes ? GF_OK : err->status;
}

/* ---- per-line validation ---------------------------------------------- */

/* One range of lines being checked (every range has its own; the
 * archive, its members' marks and the example count are shared). */
typedef struct {
    const DatasetLimits *lim;
    TarIndex *tar;            /* NULL when no archive */
    uint8_t *member_ok;       /* per archive member: 0 unchecked, 1 ok (__atomic: ranges share it) */
    uint64_t *examples;       /* valid examples of every range so far (__atomic) */
    DatasetReport *report;    /* this range's, its lines numbered from 1 */
    uint64_t line_images;
    int first;                /* the range starts the file (a byte-order mark may open it) */
} Ctx;

static GfStatus line_err(GfError *err, const char *code, const char *fmt, const char *detail) {
    return gf_error_set(err, GF_UNPROCESSABLE, code, NULL, fmt, detail ? detail : "");
}

static GfStatus check_decoded(const uint8_t *bytes, size_t n, const ImageLimits *lim, GfError *err) {
    Image img;
    GfStatus st = image_decode(bytes, n, lim, &img, err);
    image_free(&img);
    return st;
}

static GfStatus check_mime(const char *mime, size_t len, ImageFormat fmt, GfError *err) {
    int is_png = len == 9 && strncmp(mime, "image/png", 9) == 0;
    int is_jpeg = (len == 10 && strncmp(mime, "image/jpeg", 10) == 0) ||
                  (len == 9 && strncmp(mime, "image/jpg", 9) == 0);
    if (!is_png && !is_jpeg)
        return gf_error_set(err, GF_UNSUPPORTED, "unsupported_image_format", NULL,
                            "data URL type must be image/png or image/jpeg");
    if ((is_png && fmt != IMAGE_FORMAT_PNG) || (is_jpeg && fmt != IMAGE_FORMAT_JPEG))
        return gf_error_set(err, GF_INVALID, "invalid_image", NULL,
                            "data URL declares %.10s but the bytes are not that format", mime);
    return GF_OK;
}

static GfStatus resolve_data_url(Ctx *c, const char *url, GfError *err) {
    const char *mime;
    size_t mime_len, n;
    uint8_t *bytes = NULL;
    GfStatus st = data_url_decode(url, &mime, &mime_len, &bytes, &n, c->lim->image.max_bytes, err);
    if (st) return st;
    st = check_mime(mime, mime_len, image_sniff(bytes, n), err);
    if (!st) st = check_decoded(bytes, n, &c->lim->image, err);
    free(bytes);
    return st;
}

static GfStatus resolve_member(Ctx *c, const char *ref, GfError *err) {
    char name[TAR_NAME_MAX + 2];
    if (strlen(ref) > TAR_NAME_MAX) return line_err(err, "unknown_image_reference", "image reference is too long%s", "");
    strcpy(name, ref);
    if (tar_name_normalize(name))
        return line_err(err, "unknown_image_reference", "image reference '%.80s' is not a safe relative path", ref);
    if (!c->tar)
        return line_err(err, "unknown_image_reference", "image '%.80s' is referenced but no images archive was uploaded", name);
    long i = tar_find(c->tar, name);
    if (i < 0) return line_err(err, "unknown_image_reference", "image '%.80s' is not in the images archive", name);
    if (__atomic_load_n(&c->member_ok[i], __ATOMIC_RELAXED)) return GF_OK; /* another line decoded it */
    uint8_t *bytes;
    GfStatus st = tar_read_member(c->tar, (size_t)i, c->lim->image.max_bytes, &bytes, err);
    if (st) return st;
    st = check_decoded(bytes, (size_t)c->tar->members[i].size, &c->lim->image, err);
    free(bytes);
    if (!st) __atomic_store_n(&c->member_ok[i], 1, __ATOMIC_RELAXED);
    return st;
}

static GfStatus resolve_image(Ctx *c, const char *ref, GfError *err) {
    if (++c->line_images > c->lim->max_images_per_example)
        return gf_error_set(err, GF_UNPROCESSABLE, "too_many_images", NULL,
                            "more than %u images in one example", c->lim->max_images_per_example);
    if (strncmp(ref, "data:", 5) == 0) return resolve_data_url(c, ref, err);
    if (strstr(ref, "://"))
        return line_err(err, "remote_images_not_supported",
                        "image '%.80s' is a URL; give the image in the archive or as a data: URL", ref);
    return resolve_member(c, ref, err);
}

static GfStatus check_part(Ctx *c, const cJSON *part, const char *role, GfError *err) {
    if (!cJSON_IsObject(part)) return line_err(err, "invalid_content", "a content part is not an object%s", "");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
    if (!cJSON_IsString(type)) return line_err(err, "invalid_content", "a content part has no string 'type'%s", "");
    const char *t = type->valuestring;
    int is_image = strcmp(t, "image") == 0 || strcmp(t, "image_url") == 0;
    if (strcmp(t, "text") == 0) {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(text)) return line_err(err, "invalid_content", "text part has no string 'text'%s", "");
        if (cJSON_GetArraySize(part) != 2) return line_err(err, "invalid_content", "text part has unknown keys%s", "");
        return GF_OK;
    }
    if (!is_image) return line_err(err, "invalid_content", "unknown content part type '%.40s'", t);
    if (strcmp(role, "user") != 0)
        return line_err(err, strcmp(role, "assistant") == 0 ? "image_in_assistant_message" : "image_in_system_message",
                        "images are only allowed in user turns, not in a %s turn", role);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(part, t);
    const char *ref = NULL;
    if (strcmp(t, "image") == 0 && cJSON_IsString(v) && cJSON_GetArraySize(part) == 2) ref = v->valuestring;
    if (strcmp(t, "image_url") == 0 && cJSON_IsObject(v)) {
        const cJSON *url = cJSON_GetObjectItemCaseSensitive(v, "url");
        if (cJSON_IsString(url)) ref = url->valuestring;
    }
    if (!ref) return line_err(err, "invalid_content", "image part needs \"%s\" with a path or data URL", t);
    return resolve_image(c, ref, err);
}

static GfStatus check_message(Ctx *c, const cJSON *m, size_t index, GfError *err) {
    if (!cJSON_IsObject(m)) return line_err(err, "invalid_message", "a message is not an object%s", "");
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (!cJSON_IsString(role)) return line_err(err, "invalid_message", "a message has no string 'role'%s", "");
    const char *r = role->valuestring;
    if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant"))
        return line_err(err, "unknown_role", "unknown role '%.40s' (system, user or assistant)", r);
    if (strcmp(r, "system") == 0 && index != 0)
        return line_err(err, "invalid_message", "a system message may only come first%s", "");
    const cJSON *weight = cJSON_GetObjectItemCaseSensitive(m, "weight");
    if (weight && strcmp(r, "assistant") != 0)
        return line_err(err, "invalid_weight", "'weight' is only for assistant messages, not a %s message", r);
    if (weight && !(cJSON_IsNumber(weight) && (weight->valuedouble == 0 || weight->valuedouble == 1)))
        return line_err(err, "invalid_weight", "'weight' must be 0 (leave the turn out of training) or 1%s", "");
    if (cJSON_GetArraySize(m) != 2 + (weight != NULL) || !content)
        return line_err(err, "invalid_message", "a message needs exactly 'role' and 'content' (and, for an assistant, "
                        "an optional 'weight')%s", "");
    if (cJSON_IsString(content)) {
        if (content->valuestring[0] == '\0') return line_err(err, "empty_content", "a %s message has empty content", r);
        return GF_OK;
    }
    if (!cJSON_IsArray(content)) return line_err(err, "invalid_content", "content must be a string or a list of parts%s", "");
    if (cJSON_GetArraySize(content) == 0) return line_err(err, "empty_content", "a %s message has empty content", r);
    for (const cJSON *p = content->child; p; p = p->next) {
        GfStatus st = check_part(c, p, r, err);
        if (st) return st;
    }
    return GF_OK;
}

static GfStatus check_example(Ctx *c, const char *line, size_t n, GfError *err) {
    GfError jerr;
    cJSON *root = json_parse_strict(line, n, "line", &jerr);
    if (!root) return json_error(err, &jerr, GF_UNPROCESSABLE, "invalid_json", NULL);
    GfStatus st = GF_OK;
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    c->line_images = 0;
    if (!cJSON_IsObject(root)) st = line_err(err, "invalid_json", "the line is not a JSON object%s", "");
    else if (!cJSON_IsArray(msgs)) st = line_err(err, "missing_messages", "the line has no 'messages' list%s", "");
    else if (cJSON_GetArraySize(root) != 1) st = line_err(err, "unknown_field", "only 'messages' is allowed at the top level%s", "");
    else if (cJSON_GetArraySize(msgs) == 0) st = line_err(err, "missing_messages", "'messages' is empty%s", "");
    int has_assistant = 0, trained = 0;
    size_t i = 0;
    for (const cJSON *m = st ? NULL : msgs->child; m && !st; m = m->next, i++) {
        st = check_message(c, m, i, err);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!st && strcmp(role->valuestring, "assistant") == 0) {
            const cJSON *w = cJSON_GetObjectItemCaseSensitive(m, "weight");
            has_assistant = 1;
            trained += !w || w->valuedouble == 1;
        }
    }
    if (!st && !has_assistant) st = line_err(err, "no_assistant_turn", "the conversation has no assistant turn%s", "");
    if (!st && !trained)
        st = line_err(err, "no_trained_turn", "every assistant turn has 'weight': 0, so nothing of the line is trained%s", "");
    cJSON_Delete(root);
    return st;
}

/* ---- file scanning ---------------------------------------------------- */

GfStatus dataset_report_add(DatasetReport *r, uint64_t line, const char *code, const char *message, size_t max_kept) {
    if (line) r->n_bad_lines++;
    if (r->n_issues >= max_kept) return GF_OK;
    if (!r->issues && !(r->issues = calloc(max_kept, sizeof *r->issues))) return GF_NO_MEMORY;
    DatasetIssue *is = &r->issues[r->n_issues++];
    is->line = line;
    gf_strlcpy(is->code, code, sizeof is->code);
    gf_strlcpy(is->message, message, sizeof is->message);
    return GF_OK;
}

/* The array was allocated for max_issues_kept when validation began. */
static void add_issue(DatasetReport *r, const DatasetLimits *lim, uint64_t line, const GfError *e) {
    dataset_report_add(r, line, e->code[0] ? e->code : "invalid_example", e->message, lim->max_issues_kept);
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t') return 0;
    return 1;
}

static void handle_line(Ctx *c, char *line, size_t n, uint64_t lineno) {
    if (n && line[n - 1] == '\r') n--;
    if (c->first && lineno == 1 && n >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0) { line += 3; n -= 3; }
    if (is_blank(line, n)) return;
    GfError e;
    gf_error_clear(&e);
    if (check_example(c, line, n, &e)) add_issue(c->report, c->lim, lineno, &e);
    else {
        c->report->n_examples++;
        c->report->n_images += c->line_images;
        __atomic_fetch_add(c->examples, 1, __ATOMIC_RELAXED);
    }
}

static int too_many(const Ctx *c) { return __atomic_load_n(c->examples, __ATOMIC_RELAXED) > c->lim->max_examples; }

static void line_too_long(Ctx *c, uint64_t lineno, size_t cap) {
    GfError e;
    gf_error_set(&e, GF_UNPROCESSABLE, "line_too_long", NULL, "the line is longer than %zu bytes", cap);
    add_issue(c->report, c->lim, lineno, &e);
}

/* Streams bytes [start, end) of the file, whole lines (the last range's
 * final line may lack its newline); a line longer than the cap is
 * reported and skipped without being buffered whole. Stops early once
 * the ranges together have more examples than the limit. */
static GfStatus scan_lines(Ctx *c, int fd, uint64_t start, uint64_t end, GfError *err) {
    size_t cap = (size_t)c->lim->max_line_bytes;
    char *line = gf_malloc(cap + 1, err);
    char chunk[65536];
    if (!line) return GF_NO_MEMORY;
    size_t len = 0;
    int too_long = 0, any = 0;
    uint64_t lineno = 1;
    for (uint64_t at = start; at < end && !too_many(c);) {
        size_t want = end - at < sizeof chunk ? (size_t)(end - at) : sizeof chunk;
        ssize_t r = pread(fd, chunk, want, (off_t)at);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { free(line); return gf_error_set(err, GF_IO, "io_error", NULL, "dataset: read failed"); }
        if (r == 0) break;
        at += (uint64_t)r;
        for (ssize_t i = 0; i < r; i++) {
            char ch = chunk[i];
            any = 1;
            if (ch == '\n') {
                if (too_long) line_too_long(c, lineno, cap);
                else handle_line(c, line, len, lineno);
                lineno++;
                len = 0;
                too_long = any = 0;
                if (too_many(c)) break;
                continue;
            }
            if (too_long) continue;
            if (len == cap) { too_long = 1; continue; }
            line[len++] = ch;
        }
    }
    if (any && !too_many(c)) {
        if (too_long) line_too_long(c, lineno, cap);
        else handle_line(c, line, len, lineno);
        c->report->n_lines = lineno;
    } else {
        c->report->n_lines = lineno - 1;
    }
    free(line);
    return GF_OK;
}

/* ---- ranges checked in parallel ------------------------------------------------- */

#define MAX_RANGES 8
#define AUTO_RANGE_BYTES (16u << 10) /* the least a range is worth a thread for (its lines may name big images) */

typedef struct {
    Ctx c;
    DatasetReport report;
    uint64_t start, end;
    GfStatus st;
    GfError err;
} Range;

typedef struct {
    Range *r;
    int n;
    int fd;
} Ranges;

static void scan_task(void *ctx, int ith, int nth) {
    Ranges *rs = ctx;
    for (int i = ith; i < rs->n; i += nth) {
        Range *r = &rs->r[i];
        r->st = scan_lines(&r->c, rs->fd, r->start, r->end, &r->err);
    }
}

/* The offset just past the first newline at or after `from` (size when
 * there is none, or on a read error: the range then runs to the end). */
static uint64_t next_line(int fd, uint64_t from, uint64_t size) {
    char buf[4096];
    while (from < size) {
        ssize_t r = pread(fd, buf, sizeof buf, (off_t)from);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return size;
        const char *nl = memchr(buf, '\n', (size_t)r);
        if (nl) return from + (uint64_t)(nl - buf) + 1;
        from += (uint64_t)r;
    }
    return size;
}

/* Cuts the file into up to `want` ranges of whole lines, nearly equal in
 * bytes; returns how many (at least 1). */
static int cut_ranges(int fd, uint64_t size, int want, Range *r) {
    int n = 0;
    uint64_t at = 0;
    while (at < size || n == 0) {
        uint64_t target = n + 1 < want ? size * (uint64_t)(n + 1) / (uint64_t)want : size;
        uint64_t end = n + 1 < want ? next_line(fd, target > at ? target : at, size) : size;
        r[n].start = at;
        r[n].end = end;
        n++;
        at = end;
    }
    return n;
}

/* How many ranges: lim->n_threads when set, else one per core up to
 * MAX_RANGES and one per AUTO_RANGE_BYTES of the file. */
static int ranges_wanted(const DatasetLimits *lim, uint64_t size) {
    if (lim->n_threads > 0) return lim->n_threads < MAX_RANGES ? lim->n_threads : MAX_RANGES;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    uint64_t by_size = size / AUTO_RANGE_BYTES + 1;
    long n = cores < MAX_RANGES ? cores : MAX_RANGES;
    return (int)((uint64_t)n < by_size ? (n > 0 ? n : 1) : by_size);
}

/* The ranges' reports as one, their lines renumbered in file order: the
 * counts summed, the issues concatenated up to the kept number (each
 * range kept its first ones, so these are the file's first). */
static GfStatus merge_reports(Range *r, int n, const DatasetLimits *lim, DatasetReport *out, GfError *err) {
    uint64_t lines_before = 0;
    for (int i = 0; i < n; i++) {
        DatasetReport *p = &r[i].report;
        for (size_t k = 0; k < p->n_issues && out->n_issues < lim->max_issues_kept; k++) {
            DatasetIssue is = p->issues[k];
            if (is.line) is.line += lines_before;
            if (!out->issues && !(out->issues = gf_calloc(lim->max_issues_kept, sizeof *out->issues, err)))
                return GF_NO_MEMORY;
            out->issues[out->n_issues++] = is;
        }
        out->n_examples += p->n_examples;
        out->n_images += p->n_images;
        out->n_bad_lines += p->n_bad_lines;
        lines_before += p->n_lines;
    }
    out->n_lines = lines_before;
    return GF_OK;
}

/* Checks every line of the file, its ranges on a thread each. */
static GfStatus scan_file(const Ctx *proto, int fd, DatasetReport *report, GfError *err) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) return gf_error_set(err, GF_IO, "io_error", NULL, "dataset: cannot read the uploaded file");
    uint64_t size = (uint64_t)sb.st_size;
    Range r[MAX_RANGES];
    memset(r, 0, sizeof r);
    uint64_t examples = 0;
    Ranges rs = {r, cut_ranges(fd, size, ranges_wanted(proto->lim, size), r), fd};
    for (int i = 0; i < rs.n; i++) {
        r[i].c = *proto;
        r[i].c.examples = &examples;
        r[i].c.report = &r[i].report;
        r[i].c.first = i == 0;
    }
    KnPool *pool = rs.n > 1 ? kn_pool_new(rs.n, NULL) : NULL; /* none: the ranges one after another */
    kn_pool_run(pool, scan_task, &rs);
    kn_pool_free(pool);
    GfStatus st = GF_OK;
    for (int i = 0; i < rs.n && !st; i++)
        if ((st = r[i].st)) *err = r[i].err;
    if (!st) st = merge_reports(r, rs.n, proto->lim, report, err);
    for (int i = 0; i < rs.n; i++) dataset_report_free(&r[i].report);
    return st;
}

static GfStatus summarize(Ctx *c, GfError *err) {
    DatasetReport *r = c->report;
    const DatasetLimits *lim = c->lim;
    if (r->n_examples > lim->max_examples)
        return gf_error_set(err, GF_TOO_LARGE, "dataset_too_large", "file",
                            "the dataset has more than %llu examples", (unsigned long long)lim->max_examples);
    if (r->n_bad_lines)
        return gf_error_set(err, GF_UNPROCESSABLE, "invalid_dataset", "file",
                            "%llu of %llu lines are invalid; see error.details",
                            (unsigned long long)r->n_bad_lines,
                            (unsigned long long)(r->n_examples + r->n_bad_lines));
    if (r->n_examples == 0)
        return gf_error_set(err, GF_UNPROCESSABLE, "empty_dataset", "file", "the dataset has no examples");
    if (r->n_examples < lim->min_examples)
        return gf_error_set(err, GF_UNPROCESSABLE, "too_few_examples", "file",
                            "the dataset has %llu examples; at least %llu are needed",
                            (unsigned long long)r->n_examples, (unsigned long long)lim->min_examples);
    return GF_OK;
}

GfStatus dataset_validate(const char *jsonl_path, const char *tar_path, const DatasetLimits *lim,
                          DatasetReport *report, GfError *err) {
    memset(report, 0, sizeof *report);
    TarIndex tar = {.fd = -1};
    Ctx c = {.lim = lim, .report = report}; /* the ranges' own reports are merged into it */
    GfStatus st = GF_OK;
    if (tar_path) {
        st = tar_index_open(tar_path, lim->max_archive_members, &tar, err);
        if (st) return st;
        c.tar = &tar;
        c.member_ok = gf_calloc(tar.n_members, 1, err);
        if (!c.member_ok) { tar_index_close(&tar); return GF_NO_MEMORY; }
    }
    int fd = open(jsonl_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) st = gf_error_set(err, GF_IO, "io_error", NULL, "dataset: cannot open the uploaded file");
    else st = scan_file(&c, fd, report, err);
    if (fd >= 0) close(fd);
    if (!st) {
        st = summarize(&c, err);
    }
    free(c.member_ok);
    if (c.tar) tar_index_close(&tar);
    return st;
}
