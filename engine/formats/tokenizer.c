/* tokenizer.c - Gemma's tokenizer.json: loading, encoding, decoding. */
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsoncheck.h"

/* tokenizer.json holds a vocabulary and its merges: millions of values
 * (Gemma's 262,144 tokens with their merges are more than a million). */
#define TOKENIZER_JSON_VALUES_MAX (1L << 26)

/* ---- hash tables ------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return x;
}

/* string -> id, open addressing; keys point into the owning Tokenizer. */
typedef struct {
    const char **keys;
    uint32_t *lens;
    int32_t *vals;
    size_t cap;
} StrMap;

static int strmap_init(StrMap *m, size_t n) {
    m->cap = 16;
    while (m->cap < n * 2) m->cap *= 2;
    m->keys = gf_calloc(m->cap, sizeof *m->keys, NULL);
    m->lens = gf_calloc(m->cap, sizeof *m->lens, NULL);
    m->vals = gf_calloc(m->cap, sizeof *m->vals, NULL);
    return m->keys && m->lens && m->vals ? 0 : -1;
}

static void strmap_put(StrMap *m, const char *k, size_t n, int32_t v) {
    size_t i = hash_bytes(k, n) & (m->cap - 1);
    while (m->keys[i] && !(m->lens[i] == n && memcmp(m->keys[i], k, n) == 0)) i = (i + 1) & (m->cap - 1);
    m->keys[i] = k;
    m->lens[i] = (uint32_t)n;
    m->vals[i] = v;
}

static int32_t strmap_get(const StrMap *m, const char *k, size_t n) {
    size_t i = hash_bytes(k, n) & (m->cap - 1);
    while (m->keys[i]) {
        if (m->lens[i] == n && memcmp(m->keys[i], k, n) == 0) return m->vals[i];
        i = (i + 1) & (m->cap - 1);
    }
    return -1;
}

/* (left, right) -> (rank, merged) */
typedef struct {
    uint64_t *keys;           /* key + 1, 0 = empty */
    uint32_t *rank;
    int32_t *merged;
    size_t cap;
} MergeMap;

static int mergemap_init(MergeMap *m, size_t n) {
    m->cap = 16;
    while (m->cap < n * 2) m->cap *= 2;
    m->keys = gf_calloc(m->cap, sizeof *m->keys, NULL);
    m->rank = gf_calloc(m->cap, sizeof *m->rank, NULL);
    m->merged = gf_calloc(m->cap, sizeof *m->merged, NULL);
    return m->keys && m->rank && m->merged ? 0 : -1;
}

static void mergemap_put(MergeMap *m, int32_t a, int32_t b, uint32_t rank, int32_t merged) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t i = mix64(key) & (m->cap - 1);
    while (m->keys[i] && m->keys[i] != key) i = (i + 1) & (m->cap - 1);
    m->keys[i] = key;
    m->rank[i] = rank;
    m->merged[i] = merged;
}

static int mergemap_get(const MergeMap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *merged) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t i = mix64(key) & (m->cap - 1);
    while (m->keys[i]) {
        if (m->keys[i] == key) { *rank = m->rank[i]; *merged = m->merged[i]; return 1; }
        i = (i + 1) & (m->cap - 1);
    }
    return 0;
}

/* ---- the tokenizer ------------------------------------------------------------- */

typedef struct {
    int32_t child_base;       /* unused: edges live in the trie hash */
    int32_t id;               /* added token ending here, or -1 */
    uint8_t special;
} TrieNode;

typedef struct {
    char *from, *to;          /* Replace pattern and content */
    size_t from_len, to_len;
} Replace;

struct Tokenizer {
    StrMap vocab;             /* model vocab and added tokens, string -> id */
    MergeMap merges;
    char **id_to_token;       /* [n_ids] owned strings or NULL */
    uint32_t *token_len;
    uint8_t *special, *added;
    size_t n_ids;
    int32_t byte_token[256];
    int32_t unk_id, bos_id;
    int add_bos;
    Replace norm[4];          /* normalizer: a sequence of replaces */
    int n_norm;
    /* added-token trie: nodes + edge hash (node << 8 | byte) -> child */
    TrieNode *nodes;
    size_t n_nodes, cap_nodes;
    uint64_t *edge_keys;      /* key + 1 */
    int32_t *edge_vals;
    size_t edge_cap, n_edges;
    char **retired;           /* vocab strings an added token replaced; still keys of `vocab` */
    size_t n_retired;
};

size_t tokenizer_vocab_size(const Tokenizer *t) { return t->n_ids; }
const char *tokenizer_token(const Tokenizer *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_ids ? t->id_to_token[id] : NULL;
}
int tokenizer_is_special(const Tokenizer *t, int32_t id) { return id >= 0 && (size_t)id < t->n_ids && t->special[id]; }
int32_t tokenizer_token_id(const Tokenizer *t, const char *token) { return strmap_get(&t->vocab, token, strlen(token)); }

void tokenizer_free(Tokenizer *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n_ids; i++) free(t->id_to_token[i]);
    free(t->id_to_token);
    free(t->token_len);
    free(t->special);
    free(t->added);
    free(t->vocab.keys); free(t->vocab.lens); free(t->vocab.vals);
    free(t->merges.keys); free(t->merges.rank); free(t->merges.merged);
    for (int i = 0; i < t->n_norm; i++) { free(t->norm[i].from); free(t->norm[i].to); }
    free(t->nodes);
    free(t->edge_keys);
    free(t->edge_vals);
    for (size_t i = 0; i < t->n_retired; i++) free(t->retired[i]);
    free(t->retired);
    free(t);
}

static GfStatus bad(GfError *err, const char *fmt, const char *what) {
    return gf_error_set(err, GF_INVALID, "invalid_tokenizer", NULL, fmt, what ? what : "");
}

/* ---- trie of added tokens ------------------------------------------------------ */

static int32_t trie_child(const Tokenizer *t, int32_t node, uint8_t b) {
    uint64_t key = ((uint64_t)node << 8 | b) + 1;
    size_t i = mix64(key) & (t->edge_cap - 1);
    while (t->edge_keys[i]) {
        if (t->edge_keys[i] == key) return t->edge_vals[i];
        i = (i + 1) & (t->edge_cap - 1);
    }
    return -1;
}

static int trie_add_node(Tokenizer *t) {
    if (t->n_nodes == t->cap_nodes) {
        size_t nc = t->cap_nodes ? t->cap_nodes * 2 : 1024;
        TrieNode *n = gf_realloc(t->nodes, nc * sizeof *n, NULL);
        if (!n) return -1;
        t->nodes = n;
        t->cap_nodes = nc;
    }
    t->nodes[t->n_nodes] = (TrieNode){0, -1, 0};
    return (int)t->n_nodes++;
}

static int trie_insert(Tokenizer *t, const char *s, size_t n, int32_t id, int special) {
    int32_t node = 0;
    for (size_t k = 0; k < n; k++) {
        int32_t c = trie_child(t, node, (uint8_t)s[k]);
        if (c < 0) {
            if ((c = trie_add_node(t)) < 0 || t->n_edges * 2 >= t->edge_cap) return -1;
            uint64_t key = ((uint64_t)node << 8 | (uint8_t)s[k]) + 1;
            size_t i = mix64(key) & (t->edge_cap - 1);
            while (t->edge_keys[i]) i = (i + 1) & (t->edge_cap - 1);
            t->edge_keys[i] = key;
            t->edge_vals[i] = c;
            t->n_edges++;
        }
        node = c;
    }
    t->nodes[node].id = id;
    t->nodes[node].special = (uint8_t)special;
    return 0;
}

/* Longest added token starting at s[0..n); returns its length or 0. */
static size_t trie_match(const Tokenizer *t, const char *s, size_t n, int parse_special, int32_t *id) {
    int32_t node = 0;
    size_t best = 0;
    for (size_t k = 0; k < n; k++) {
        node = trie_child(t, node, (uint8_t)s[k]);
        if (node < 0) break;
        if (t->nodes[node].id >= 0 && (parse_special || !t->nodes[node].special)) {
            best = k + 1;
            *id = t->nodes[node].id;
        }
    }
    return best;
}

/* ---- loading ------------------------------------------------------------------- */

static GfStatus set_token(Tokenizer *t, int32_t id, const char *s, GfError *err) {
    if (id < 0 || (size_t)id >= t->n_ids) return bad(err, "token id out of range for '%.60s'", s);
    if (t->id_to_token[id] && strcmp(t->id_to_token[id], s) == 0) return GF_OK; /* may be a key of t->vocab */
    free(t->id_to_token[id]);
    if (!(t->id_to_token[id] = gf_strdup(s, err))) return GF_NO_MEMORY;
    t->token_len[id] = (uint32_t)strlen(s);
    return GF_OK;
}

static GfStatus load_normalizer(Tokenizer *t, const cJSON *n, GfError *err) {
    if (!n || cJSON_IsNull(n)) return GF_OK;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(n, "type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        for (const cJSON *e = cJSON_IsArray(list) ? list->child : NULL; e; e = e->next)
            if (load_normalizer(t, e, err)) return GF_INVALID;
        return GF_OK;
    }
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(n, "pattern"), *content = cJSON_GetObjectItemCaseSensitive(n, "content");
    const cJSON *str = pat ? cJSON_GetObjectItemCaseSensitive(pat, "String") : NULL;
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "Replace") != 0 || !cJSON_IsString(str) || !cJSON_IsString(content) ||
        !str->valuestring[0] || t->n_norm == 4)
        return bad(err, "normalizer %.40s is not supported (only Replace of a string)", cJSON_IsString(type) ? type->valuestring : "?");
    Replace *r = &t->norm[t->n_norm++];
    r->from = gf_strdup(str->valuestring, err);
    r->to = gf_strdup(content->valuestring, err);
    if (!r->from || !r->to) return GF_NO_MEMORY;
    r->from_len = strlen(r->from);
    r->to_len = strlen(r->to);
    return GF_OK;
}

/* The pre-tokenizer may only be the Split(" ") that the space normalizer makes a no-op. */
static GfStatus check_pipeline(const Tokenizer *t, const cJSON *root, GfError *err) {
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pre && !cJSON_IsNull(pre)) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(pre, "type"), *pat = cJSON_GetObjectItemCaseSensitive(pre, "pattern");
        const cJSON *str = pat ? cJSON_GetObjectItemCaseSensitive(pat, "String") : NULL;
        int space_replaced = 0;
        for (int i = 0; i < t->n_norm; i++) space_replaced |= strcmp(t->norm[i].from, " ") == 0;
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "Split") || !cJSON_IsString(str) || strcmp(str->valuestring, " ") ||
            !space_replaced)
            return bad(err, "pre_tokenizer %s is not supported", cJSON_IsString(type) ? type->valuestring : "?");
    }
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    const cJSON *dtype = dec ? cJSON_GetObjectItemCaseSensitive(dec, "type") : NULL;
    if (dec && !cJSON_IsNull(dec) && !(cJSON_IsString(dtype) && strcmp(dtype->valuestring, "Sequence") == 0))
        return bad(err, "decoder %s is not supported", cJSON_IsString(dtype) ? dtype->valuestring : "?");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *mtype = cJSON_GetObjectItemCaseSensitive(model, "type"), *bf = cJSON_GetObjectItemCaseSensitive(model, "byte_fallback");
    const cJSON *drop = cJSON_GetObjectItemCaseSensitive(model, "dropout"), *ign = cJSON_GetObjectItemCaseSensitive(model, "ignore_merges");
    const cJSON *cont = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    const cJSON *suffix = cJSON_GetObjectItemCaseSensitive(model, "end_of_word_suffix");
    if (!cJSON_IsString(mtype) || strcmp(mtype->valuestring, "BPE") != 0) return bad(err, "model type %s is not supported (BPE only)", cJSON_IsString(mtype) ? mtype->valuestring : "?");
    if (!cJSON_IsTrue(bf)) return bad(err, "BPE without byte_fallback is not supported%s", "");
    if ((drop && !cJSON_IsNull(drop) && !(cJSON_IsNumber(drop) && drop->valuedouble == 0)) || cJSON_IsTrue(ign) ||
        (cont && !cJSON_IsNull(cont)) || (suffix && !cJSON_IsNull(suffix)))
        return bad(err, "BPE options (dropout, ignore_merges, affixes) are not supported%s", "");
    return GF_OK;
}

static GfStatus load_vocab(Tokenizer *t, const cJSON *vocab, const cJSON *added, GfError *err) {
    int64_t max_id = -1;
    size_t n = 0;
    for (const cJSON *e = vocab->child; e; e = e->next, n++) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 16777216) return bad(err, "vocab entry '%.60s' has a bad id", e->string);
        if (e->valuedouble > max_id) max_id = (int64_t)e->valuedouble;
    }
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > 16777216) return bad(err, "an added token has a bad id%s", "");
        if (id->valuedouble > max_id) max_id = (int64_t)id->valuedouble;
        n++;
    }
    t->n_ids = (size_t)(max_id + 1);
    t->id_to_token = gf_calloc(t->n_ids, sizeof *t->id_to_token, NULL);
    t->token_len = gf_calloc(t->n_ids, sizeof *t->token_len, NULL);
    t->special = gf_calloc(t->n_ids, 1, NULL);
    t->added = gf_calloc(t->n_ids, 1, NULL);
    if (!t->id_to_token || !t->token_len || !t->special || !t->added || strmap_init(&t->vocab, n))
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    for (const cJSON *e = vocab->child; e; e = e->next)
        if (set_token(t, (int32_t)e->valuedouble, e->string, err)) return err->status;
    for (size_t id = 0; id < t->n_ids; id++)
        if (t->id_to_token[id]) strmap_put(&t->vocab, t->id_to_token[id], t->token_len[id], (int32_t)id);
    return GF_OK;
}

/* An added token that reuses a vocab id with other content: the vocab string
 * stays a key of t->vocab (the BPE model still knows it), so it is kept alive. */
static GfStatus retire_if_replaced(Tokenizer *t, int32_t id, const char *content, GfError *err) {
    if (id < 0 || (size_t)id >= t->n_ids || !t->id_to_token[id]) return GF_OK;
    if (strcmp(t->id_to_token[id], content) == 0) return GF_OK;
    char **r = gf_realloc(t->retired, (t->n_retired + 1) * sizeof *r, NULL);
    if (!r) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    t->retired = r;
    t->retired[t->n_retired++] = t->id_to_token[id];
    t->id_to_token[id] = NULL;
    return GF_OK;
}

static GfStatus load_added(Tokenizer *t, const cJSON *added, GfError *err) {
    t->edge_cap = 1024;
    size_t total = 0;
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(a, "content");
        total += cJSON_IsString(c) ? strlen(c->valuestring) : 0;
    }
    while (t->edge_cap < total * 2 + 16) t->edge_cap *= 2;
    t->edge_keys = gf_calloc(t->edge_cap, sizeof *t->edge_keys, NULL);
    t->edge_vals = gf_calloc(t->edge_cap, sizeof *t->edge_vals, NULL);
    if (!t->edge_keys || !t->edge_vals || trie_add_node(t) < 0) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    static const char *const flags[] = {"single_word", "lstrip", "rstrip", "normalized"};
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id"), *c = cJSON_GetObjectItemCaseSensitive(a, "content");
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(a, "special");
        if (!cJSON_IsString(c) || !c->valuestring[0]) return bad(err, "an added token has no content%s", "");
        for (int f = 0; f < 4; f++)
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, flags[f])))
                return bad(err, "added token flags (single_word, lstrip, rstrip, normalized) are not supported: '%.60s'", c->valuestring);
        int32_t i = (int32_t)id->valuedouble;
        if (retire_if_replaced(t, i, c->valuestring, err) || set_token(t, i, c->valuestring, err)) return err->status;
        t->special[i] = (uint8_t)cJSON_IsTrue(sp);
        t->added[i] = 1;
        strmap_put(&t->vocab, t->id_to_token[i], t->token_len[i], i);
        if (trie_insert(t, c->valuestring, strlen(c->valuestring), i, t->special[i]))
            return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    }
    return GF_OK;
}

static GfStatus load_merges(Tokenizer *t, const cJSON *merges, GfError *err) {
    if (mergemap_init(&t->merges, (size_t)cJSON_GetArraySize(merges)))
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    uint32_t rank = 0;
    char buf[1024];
    for (const cJSON *e = merges->child; e; e = e->next, rank++) {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) && cJSON_IsString(e->child->next)) {
            a = e->child->valuestring;
            b = e->child->next->valuestring;
            la = strlen(a);
            lb = strlen(b);
        } else if (cJSON_IsString(e) && strchr(e->valuestring, ' ')) {
            a = e->valuestring;
            la = (size_t)(strchr(a, ' ') - a);
            b = a + la + 1;
            lb = strlen(b);
        } else {
            return bad(err, "a merge is neither [\"a\",\"b\"] nor \"a b\"%s", "");
        }
        if (la + lb >= sizeof buf) return bad(err, "a merge is too long%s", "");
        int32_t ia = strmap_get(&t->vocab, a, la), ib = strmap_get(&t->vocab, b, lb);
        memcpy(buf, a, la);
        memcpy(buf + la, b, lb);
        int32_t im = strmap_get(&t->vocab, buf, la + lb);
        if (ia < 0 || ib < 0 || im < 0) {
            buf[la + lb] = '\0';
            return bad(err, "merge to '%.60s' names a token that is not in the vocab", buf);
        }
        mergemap_put(&t->merges, ia, ib, rank, im);
    }
    return GF_OK;
}

/* BOS when the post-processor's single template starts with a special token. */
static void load_post(Tokenizer *t, const cJSON *post, int add_bos) {
    t->bos_id = tokenizer_token_id(t, "<bos>");
    if (add_bos >= 0) { t->add_bos = add_bos && t->bos_id >= 0; return; }
    const cJSON *single = post ? cJSON_GetObjectItemCaseSensitive(post, "single") : NULL;
    const cJSON *first = cJSON_IsArray(single) ? single->child : NULL;
    const cJSON *sp = first ? cJSON_GetObjectItemCaseSensitive(first, "SpecialToken") : NULL;
    const cJSON *id = sp ? cJSON_GetObjectItemCaseSensitive(sp, "id") : NULL;
    if (cJSON_IsString(id)) {
        t->bos_id = tokenizer_token_id(t, id->valuestring);
        t->add_bos = t->bos_id >= 0;
    }
}

GfStatus tokenizer_load_json(const char *json, size_t len, int add_bos, Tokenizer **out, GfError *err) {
    GfError jerr;
    cJSON *root = json_parse_strict_max(json, len, "tokenizer.json", TOKENIZER_JSON_VALUES_MAX, &jerr);
    if (!root) return json_error(err, &jerr, GF_INVALID, "invalid_tokenizer", NULL);
    Tokenizer *t = gf_calloc(1, sizeof *t, err);
    GfStatus st = t ? GF_OK : GF_NO_MEMORY;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = model ? cJSON_GetObjectItemCaseSensitive(model, "vocab") : NULL;
    const cJSON *merges = model ? cJSON_GetObjectItemCaseSensitive(model, "merges") : NULL;
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (!st && (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges) || (added && !cJSON_IsArray(added))))
        st = bad(err, "tokenizer.json needs model.vocab, model.merges and added_tokens%s", "");
    if (!st) st = load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), err);
    if (!st) st = check_pipeline(t, root, err);
    if (!st) st = load_vocab(t, vocab, added, err);
    if (!st) st = load_added(t, added, err);
    if (!st) st = load_merges(t, merges, err);
    if (!st) {
        char name[8];
        for (int b = 0; b < 256; b++) {
            snprintf(name, sizeof name, "<0x%02X>", b);
            t->byte_token[b] = tokenizer_token_id(t, name);
            if (t->byte_token[b] < 0) { st = bad(err, "byte-fallback token %s is missing", name); break; }
        }
        t->unk_id = tokenizer_token_id(t, "<unk>");
        load_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), add_bos);
    }
    cJSON_Delete(root);
    if (st) { tokenizer_free(t); return st; }
    *out = t;
    return GF_OK;
}

GfStatus tokenizer_load_dir(const char *dir, Tokenizer **out, GfError *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    size_t n = 0, cn = 0;
    char *buf = gf_read_file(path, 512u << 20, "the model's tokenizer.json", &n, err);
    if (!buf) return err->status;
    int add_bos = -1;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    GfError jerr;
    char *cfg = gf_read_file(path, 8u << 20, "tokenizer_config.json", &cn, &jerr);
    cJSON *j = cfg ? json_parse_strict(cfg, cn, "tokenizer_config.json", &jerr) : NULL;
    const cJSON *ab = j ? cJSON_GetObjectItemCaseSensitive(j, "add_bos_token") : NULL;
    if (cJSON_IsBool(ab)) add_bos = cJSON_IsTrue(ab);
    cJSON_Delete(j);
    free(cfg);
    GfStatus st = tokenizer_load_json(buf, n, add_bos, out, err);
    free(buf);
    return st;
}

/* ---- encoding -------------------------------------------------------------------- */

typedef struct {
    int32_t *v;
    size_t n, cap;
} Ids;

static int ids_push(Ids *a, int32_t id) {
    if (a->n == a->cap) {
        size_t nc = a->cap ? a->cap * 2 : 64;
        int32_t *nv = gf_realloc(a->v, nc * sizeof *nv, NULL);
        if (!nv) return -1;
        a->v = nv;
        a->cap = nc;
    }
    a->v[a->n++] = id;
    return 0;
}

/* Applies the normalizer's replaces; returns a new string. */
static char *normalize(const Tokenizer *t, const char *s, size_t n, size_t *out_len) {
    char *cur = gf_malloc(n + 1, NULL);
    if (!cur) return NULL;
    memcpy(cur, s, n);
    cur[n] = '\0';
    size_t len = n;
    for (int r = 0; r < t->n_norm; r++) {
        const Replace *rp = &t->norm[r];
        size_t count = 0;
        for (size_t i = 0; i + rp->from_len <= len; i++)
            if (memcmp(cur + i, rp->from, rp->from_len) == 0) { count++; i += rp->from_len - 1; }
        if (!count) continue;
        size_t nl = len + count * rp->to_len - count * rp->from_len, o = 0;
        char *next = gf_malloc(nl + 1, NULL);
        if (!next) { free(cur); return NULL; }
        for (size_t i = 0; i < len;) {
            if (i + rp->from_len <= len && memcmp(cur + i, rp->from, rp->from_len) == 0) {
                memcpy(next + o, rp->to, rp->to_len);
                o += rp->to_len;
                i += rp->from_len;
            } else {
                next[o++] = cur[i++];
            }
        }
        next[o] = '\0';
        free(cur);
        cur = next;
        len = nl;
    }
    *out_len = len;
    return cur;
}

static size_t utf8_len(uint8_t lead) {
    return lead < 0x80 ? 1 : (lead & 0xE0) == 0xC0 ? 2 : (lead & 0xF0) == 0xE0 ? 3 : (lead & 0xF8) == 0xF0 ? 4 : 1;
}

typedef struct {
    uint32_t rank;
    int32_t pos, merged;
} HeapItem;

static int heap_less(const HeapItem *a, const HeapItem *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(HeapItem *h, size_t *n, HeapItem it) {
    size_t i = (*n)++;
    h[i] = it;
    while (i > 0 && heap_less(&h[i], &h[(i - 1) / 2])) {
        HeapItem tmp = h[i]; h[i] = h[(i - 1) / 2]; h[(i - 1) / 2] = tmp;
        i = (i - 1) / 2;
    }
}

static HeapItem heap_pop(HeapItem *h, size_t *n) {
    HeapItem top = h[0];
    h[0] = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && heap_less(&h[l], &h[m])) m = l;
        if (r < *n && heap_less(&h[r], &h[m])) m = r;
        if (m == i) break;
        HeapItem tmp = h[i]; h[i] = h[m]; h[m] = tmp;
        i = m;
    }
    return top;
}

/* BPE of one normalized segment (TOKENIZER.md §3.4), lowest rank first,
 * leftmost on ties, over a linked list of symbols. */
static int bpe(const Tokenizer *t, const char *s, size_t n, Ids *out) {
    size_t cap = n + 1, n_sym = 0, n_heap = 0;
    int32_t *sym = gf_malloc(cap * sizeof *sym, NULL), *prev = gf_malloc(cap * sizeof *prev, NULL), *next = gf_malloc(cap * sizeof *next, NULL);
    uint8_t *alive = gf_malloc(cap, NULL);
    HeapItem *heap = gf_malloc(2 * cap * sizeof *heap + sizeof *heap, NULL);
    int rc = !sym || !prev || !next || !alive || !heap ? -1 : 0;
    for (size_t i = 0; !rc && i < n;) {
        size_t cl = utf8_len((uint8_t)s[i]);
        if (cl > n - i) cl = n - i;
        int32_t id = strmap_get(&t->vocab, s + i, cl);
        if (id >= 0) sym[n_sym++] = id;
        else for (size_t b = 0; b < cl; b++) sym[n_sym++] = t->byte_token[(uint8_t)s[i + b]]; /* byte fallback */
        i += cl;
    }
    for (size_t i = 0; !rc && i < n_sym; i++) {
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n_sym ? (int32_t)i + 1 : -1;
        alive[i] = 1;
    }
    uint32_t rank;
    int32_t merged;
    for (size_t i = 0; !rc && i + 1 < n_sym; i++)
        if (mergemap_get(&t->merges, sym[i], sym[i + 1], &rank, &merged)) heap_push(heap, &n_heap, (HeapItem){rank, (int32_t)i, merged});
    while (!rc && n_heap) {
        HeapItem it = heap_pop(heap, &n_heap);
        int32_t i = it.pos, j;
        if (!alive[i] || (j = next[i]) < 0) continue;
        if (!mergemap_get(&t->merges, sym[i], sym[j], &rank, &merged) || merged != it.merged || rank != it.rank) continue;
        sym[i] = merged;
        alive[j] = 0;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        if (prev[i] >= 0 && mergemap_get(&t->merges, sym[prev[i]], sym[i], &rank, &merged))
            heap_push(heap, &n_heap, (HeapItem){rank, prev[i], merged});
        if (next[i] >= 0 && mergemap_get(&t->merges, sym[i], sym[next[i]], &rank, &merged))
            heap_push(heap, &n_heap, (HeapItem){rank, i, merged});
    }
    for (int32_t i = n_sym ? 0 : -1; !rc && i >= 0; i = next[i]) rc = ids_push(out, sym[i]);
    free(sym); free(prev); free(next); free(alive); free(heap);
    return rc;
}

static int encode_segment(const Tokenizer *t, const char *s, size_t n, Ids *out) {
    if (n == 0) return 0;
    size_t len;
    char *norm = normalize(t, s, n, &len);
    if (!norm) return -1;
    int rc = bpe(t, norm, len, out);
    free(norm);
    return rc;
}

GfStatus tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_special, int parse_special,
                          int32_t **ids, size_t *n_ids, GfError *err) {
    if (!gf_utf8_valid(text, len)) return gf_error_set(err, GF_INVALID, "invalid_utf8", NULL, "the text is not valid UTF-8");
    Ids out = {NULL, 0, 0};
    free(*ids);
    *ids = NULL;
    int rc = add_special && t->add_bos ? ids_push(&out, t->bos_id) : 0;
    size_t seg = 0;
    for (size_t pos = 0; !rc && pos < len;) {
        int32_t id;
        size_t m = trie_match(t, text + pos, len - pos, parse_special, &id);
        if (!m) { pos++; continue; }
        rc = encode_segment(t, text + seg, pos - seg, &out) || ids_push(&out, id);
        pos += m;
        seg = pos;
    }
    if (!rc) rc = encode_segment(t, text + seg, len - seg, &out);
    if (rc) {
        free(out.v);
        *ids = NULL;
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    }
    *ids = out.v;
    *n_ids = out.n;
    return GF_OK;
}

/* ---- decoding -------------------------------------------------------------------- */

typedef struct {
    char **buf;
    size_t *len, *cap;
} Text;

static int text_put(Text *x, const char *s, size_t n) {
    if (*x->len + n + 1 > *x->cap) {
        size_t nc = *x->cap ? *x->cap : 64;
        while (nc < *x->len + n + 1) nc *= 2;
        char *nb = gf_realloc(*x->buf, nc, NULL);
        if (!nb) return -1;
        *x->buf = nb;
        *x->cap = nc;
    }
    memcpy(*x->buf + *x->len, s, n);
    *x->len += n;
    (*x->buf)[*x->len] = '\0';
    return 0;
}

/* 0..255 when the token is a byte-fallback token "<0xHH>", else -1. */
static int byte_of(const Tokenizer *t, int32_t id) {
    const char *s = t->id_to_token[id];
    if (t->token_len[id] != 6 || strncmp(s, "<0x", 3) || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return t->byte_token[v] == id ? v : -1;
}

static int put_run(Text *x, const uint8_t *bytes, size_t n) {
    if (gf_utf8_valid((const char *)bytes, n)) return text_put(x, (const char *)bytes, n);
    for (size_t i = 0; i < n; i++)
        if (text_put(x, "\xEF\xBF\xBD", 3)) return -1;
    return 0;
}

/* A token's text with the decoder's replaces (the normalizer's, reversed). */
static int put_token(const Tokenizer *t, Text *x, int32_t id) {
    const char *s = t->id_to_token[id];
    size_t n = t->token_len[id];
    if (!t->n_norm) return text_put(x, s, n);
    const Replace *r = &t->norm[0];
    for (size_t i = 0; i < n;) {
        if (i + r->to_len <= n && memcmp(s + i, r->to, r->to_len) == 0) {
            if (text_put(x, r->from, r->from_len)) return -1;
            i += r->to_len;
        } else {
            if (text_put(x, s + i, 1)) return -1;
            i++;
        }
    }
    return 0;
}

char *tokenizer_decode(const Tokenizer *t, const int32_t *ids, size_t n, int skip_special, GfError *err) {
    char *buf = NULL;
    size_t len = 0, cap = 0, n_run = 0;
    Text x = {&buf, &len, &cap};
    uint8_t *run = gf_malloc(n + 1, NULL);
    int rc = run ? text_put(&x, "", 0) : -1;
    for (size_t i = 0; !rc && i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->n_ids || !t->id_to_token[id] || (skip_special && t->special[id])) continue;
        int b = byte_of(t, id);
        if (b >= 0) { run[n_run++] = (uint8_t)b; continue; }
        if (n_run) { rc = put_run(&x, run, n_run); n_run = 0; }
        if (!rc) rc = put_token(t, &x, id);
    }
    if (!rc && n_run) rc = put_run(&x, run, n_run);
    free(run);
    if (rc) {
        free(buf);
        gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
        return NULL;
    }
    return buf;
}

GfStatus tokenizer_stream_push(const Tokenizer *t, TokenStream *s, int32_t id, int skip_special, char **out, size_t *len,
                               size_t *cap, GfError *err) {
    Text x = {out, len, cap};
    int rc = 0;
    if (id < 0 || (size_t)id >= t->n_ids || !t->id_to_token[id] || (skip_special && t->special[id])) return GF_OK;
    int b = byte_of(t, id);
    if (b < 0) {
        rc = tokenizer_stream_end(t, s, out, len, cap, err) || put_token(t, &x, id);
    } else {
        if (s->n_pending == s->cap_pending) {
            size_t nc = s->cap_pending ? 2 * s->cap_pending : 16;
            uint8_t *p = gf_realloc(s->pending, nc, NULL);
            if (!p) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
            s->pending = p;
            s->cap_pending = nc;
        }
        s->pending[s->n_pending++] = (uint8_t)b;
    }
    return rc ? gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory") : GF_OK;
}

GfStatus tokenizer_stream_end(const Tokenizer *t, TokenStream *s, char **out, size_t *len, size_t *cap, GfError *err) {
    (void)t;
    Text x = {out, len, cap};
    int rc = s->n_pending ? put_run(&x, s->pending, s->n_pending) : 0;
    tokenizer_stream_free(s);
    return rc ? gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory") : GF_OK;
}

void tokenizer_stream_free(TokenStream *s) {
    free(s->pending);
    memset(s, 0, sizeof *s);
}
