/* cli_engine.c - the engine commands: forward, generate, preprocess, tokenize, infer. */
#include "cli_engine.h"
#include "cli_inputs.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"
#include "model.h"
#include "pipeline.h"
#include "preprocess.h"
#include "jsoncheck.h"
#include "tokenizer.h"
#include "safetensors.h"

typedef struct {
    const char *model, *inputs, *out, *ids, *image, *adapter;
    const char *adapters;      /* forward: one adapter directory per row, "-" = none */
    const char *device;        /* NULL: the default (model.h) */
    const char *precision;     /* NULL: the default (model.h) */
    long max_new, threads, max_soft_tokens;
    int hidden;
    ModelQuant quantize;
} CliOptions;

static int parse(int argc, char **argv, CliOptions *o) {
    memset(o, 0, sizeof *o);
    o->max_new = 32;
    o->max_soft_tokens = 280;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--hidden") == 0) { o->hidden = 1; continue; }
        if (!v) { fprintf(stderr, "gemmaforge: %s needs a value\n", a); return -1; }
        char *end;
        if (strcmp(a, "--model") == 0) o->model = v;
        else if (strcmp(a, "--inputs") == 0) o->inputs = v;
        else if (strcmp(a, "--out") == 0) o->out = v;
        else if (strcmp(a, "--ids") == 0) o->ids = v;
        else if (strcmp(a, "--image") == 0) o->image = v;
        else if (strcmp(a, "--adapter") == 0) o->adapter = v;
        else if (strcmp(a, "--adapters") == 0) o->adapters = v;
        else if (strcmp(a, "--quantize") == 0 && cli_parse_quantize(v, &o->quantize) == 0) {}
        else if (strcmp(a, "--max-soft-tokens") == 0 && (o->max_soft_tokens = strtol(v, &end, 10), !*end)) {}
        else if (strcmp(a, "--max-new") == 0 && (o->max_new = strtol(v, &end, 10), !*end) && o->max_new > 0 && o->max_new <= 1000000) {}
        else if (strcmp(a, "--device") == 0 && cli_parse_device(v) == 0) o->device = v;
        else if (strcmp(a, "--precision") == 0 && cli_parse_precision(v) == 0) o->precision = v;
        else if (strcmp(a, "--threads") == 0 && (o->threads = strtol(v, &end, 10), !*end) && o->threads >= 0 && o->threads <= 1024) {}
        else { fprintf(stderr, "gemmaforge: unknown option or bad value: %s %s\n", a, v); return -1; }
        i++;
    }
    return 0;
}

/* Runs the tower on each image of the inputs and returns all soft tokens in
 * order (*n_soft rows of hidden) in device memory (buf, the model's to
 * free); NULL without images or on failure (*bad). */
static float *run_vision(Model *m, const LoraBinding *lora, const SafeTensors *in, KnBuffer *buf, int64_t *n_soft,
                         int *bad) {
    CliImages im;
    *n_soft = 0;
    if (cli_read_images(in, "forward", &im)) { *bad = 1; return NULL; }
    if (!im.n_images) return NULL;
    int64_t P = im.n_patches, H = model_config(m)->text.hidden_size;
    GfError err;
    float *soft = NULL;
    if (model_device_alloc(m, buf, (size_t)(im.n_images * P * H) * sizeof(float), "soft tokens", &err)) {
        fprintf(stderr, "gemmaforge forward: %s\n", err.message);
        *bad = 1;
    } else {
        soft = buf->data;
    }
    for (int64_t k = 0; soft && k < im.n_images && !*bad; k++) {
        int64_t n = 0;
        if (model_vision_forward(m, lora, im.pixels + k * P * im.patch_len, im.positions + k * P * 2, P, soft + *n_soft * H, &n,
                                 &err)) {
            fprintf(stderr, "gemmaforge forward: image %lld: %s\n", (long long)k, err.message);
            *bad = 1;
        }
        *n_soft += n;
    }
    cli_images_free(&im);
    return soft;
}

static int run_forward(Model *m, const LoraBinding *lora, const CliOptions *o, const SafeTensors *in) {
    int64_t B = 0, T = 0;
    int bad;
    int32_t *ids = cli_read_ids(in, "forward", "input_ids", &B, &T, 1, &bad);
    if (!ids) return 1;
    int32_t *mask = cli_read_ids(in, "forward", "attention_mask", &B, &T, 0, &bad);
    int32_t *mm = bad ? NULL : cli_read_ids(in, "forward", "mm_token_type_ids", &B, &T, 0, &bad);
    int64_t n_soft = 0, used_soft = 0, n_placeholders = 0;
    KnBuffer soft_buf = {0};
    float *soft = bad ? NULL : run_vision(m, lora, in, &soft_buf, &n_soft, &bad);
    for (int64_t i = 0; i < B * T; i++) n_placeholders += ids[i] == model_config(m)->image_token_id;
    if (!bad && soft && n_placeholders != n_soft) {
        fprintf(stderr, "gemmaforge forward: the images give %lld soft tokens but input_ids hold %lld image placeholders\n",
                (long long)n_soft, (long long)n_placeholders);
        bad = 1;
    }
    const TextConfig *t = &model_config(m)->text;
    int64_t V = t->vocab_size, H = t->hidden_size, L = t->n_layers;
    float *logits = bad ? NULL : malloc((size_t)(B * T * V) * sizeof(float));
    float *hidden = o->hidden && !bad ? malloc((size_t)((L + 1) * B * T * H) * sizeof(float)) : NULL;
    float *row_hidden = hidden ? malloc((size_t)((L + 1) * T * H) * sizeof(float)) : NULL;
    uint8_t *valid = malloc((size_t)T), *types = malloc((size_t)T);
    int rc = !logits || (o->hidden && !row_hidden) || !valid || !types;
    KvCache c;
    GfError err;
    if (!rc && kv_cache_init(&c, &model_config(m)->text, model_backend(m), T, &err)) {
        fprintf(stderr, "gemmaforge forward: %s\n", err.message);
        rc = 1;
    }
    for (int64_t b = 0; !rc && b < B; b++) {
        for (int64_t i = 0; i < T; i++) {
            valid[i] = mask ? mask[b * T + i] != 0 : 1;
            types[i] = mm ? (uint8_t)mm[b * T + i] : 0;
        }
        kv_cache_reset(&c);
        ModelInput mi = {.ids = ids + b * T, .valid = valid, .mm_type = mm ? types : NULL, .n = T,
                         .soft_tokens = soft ? soft + used_soft * H : NULL, .lora = lora};
        for (int64_t i = 0; i < T; i++) used_soft += ids[b * T + i] == model_config(m)->image_token_id;
        if (model_forward(m, &c, &mi, logits + b * T * V, row_hidden, &err)) {
            fprintf(stderr, "gemmaforge forward: row %lld: %s\n", (long long)b, err.message);
            rc = 1;
        }
        for (int64_t j = 0; row_hidden && j <= L; j++)
            memcpy(hidden + ((j * B + b) * T) * H, row_hidden + j * T * H, (size_t)(T * H) * sizeof(float));
    }
    float *soft_host = !rc && soft ? malloc((size_t)(n_soft * H) * sizeof(float)) : NULL;
    if (soft && !rc && !soft_host) rc = 1;
    if (soft_host) model_download(m, soft_host, soft, (size_t)(n_soft * H) * sizeof(float));
    if (!rc) {
        StWriteTensor out[3] = {{"logits", ST_F32, 3, {(uint64_t)B, (uint64_t)T, (uint64_t)V}, logits}};
        size_t n_out = 1;
        if (hidden) out[n_out++] = (StWriteTensor){"hidden_states", ST_F32, 4, {(uint64_t)(L + 1), (uint64_t)B, (uint64_t)T, (uint64_t)H}, hidden};
        if (soft) out[n_out++] = (StWriteTensor){"vision_soft_tokens", ST_F32, 2, {(uint64_t)n_soft, (uint64_t)H}, soft_host};
        if (safetensors_write(o->out, out, n_out, &err)) { fprintf(stderr, "gemmaforge forward: %s\n", err.message); rc = 1; }
    }
    if (logits) kv_cache_free(&c);
    model_device_free(m, &soft_buf);
    free(soft_host);
    free(ids); free(mask); free(mm); free(logits); free(hidden); free(row_hidden); free(valid); free(types);
    return rc;
}

/* Every row of the inputs in ONE batch, row b with adapter lora[b] (NULL =
 * the base model): the mixed-batch parity check. Images are encoded with
 * the adapter of the row that holds them. */
static int run_forward_mixed(Model *m, const LoraBinding *const *lora, const CliOptions *o, const SafeTensors *in) {
    int64_t B = 0, T = 0;
    int bad = 0;
    int32_t *ids = cli_read_ids(in, "forward", "input_ids", &B, &T, 1, &bad);
    int32_t *mm = bad ? NULL : cli_read_ids(in, "forward", "mm_token_type_ids", &B, &T, 0, &bad);
    const TextConfig *t = &model_config(m)->text;
    int64_t V = t->vocab_size, H = t->hidden_size, before = 0;
    float *logits = bad ? NULL : malloc((size_t)(B * T * V) * sizeof(float));
    float **soft = calloc((size_t)(B > 0 ? B : 1), sizeof *soft);
    KnBuffer *soft_bufs = calloc((size_t)(B > 0 ? B : 1), sizeof *soft_bufs);
    uint8_t *types = malloc((size_t)(B * T) + 1);
    KvCache *caches = calloc((size_t)(B > 0 ? B : 1), sizeof *caches);
    ModelSeq *seqs = calloc((size_t)(B > 0 ? B : 1), sizeof *seqs);
    int rc = !ids || !logits || !soft || !soft_bufs || !types || !caches || !seqs;
    GfError err;
    for (int64_t b = 0; !rc && b < B; b++) {
        int64_t here = 0, n_soft = 0;
        for (int64_t i = 0; i < T; i++) {
            here += ids[b * T + i] == model_config(m)->image_token_id;
            types[b * T + i] = mm ? (uint8_t)mm[b * T + i] : 0;
        }
        if (here) soft[b] = run_vision(m, lora[b], in, &soft_bufs[b], &n_soft, &bad);
        if (bad || (here && before + here > n_soft)) {
            fprintf(stderr, "gemmaforge forward: row %lld: its image placeholders do not match the images\n", (long long)b);
            rc = 1;
        }
        if (!rc && kv_cache_init(&caches[b], &model_config(m)->text, model_backend(m), T, &err)) {
            fprintf(stderr, "gemmaforge forward: %s\n", err.message);
            rc = 1;
        }
        seqs[b] = (ModelSeq){&caches[b], {.ids = ids + b * T, .mm_type = mm ? types + b * T : NULL, .n = T,
                                          .soft_tokens = soft[b] ? soft[b] + before * H : NULL, .lora = lora[b]}};
        before += here;
    }
    if (!rc && model_forward_batch(m, seqs, (int)B, logits, &err)) {
        fprintf(stderr, "gemmaforge forward: %s\n", err.message);
        rc = 1;
    }
    if (!rc) {
        StWriteTensor out = {"logits", ST_F32, 3, {(uint64_t)B, (uint64_t)T, (uint64_t)V}, logits};
        if (safetensors_write(o->out, &out, 1, &err)) { fprintf(stderr, "gemmaforge forward: %s\n", err.message); rc = 1; }
    }
    for (int64_t b = 0; soft_bufs && b < B; b++) model_device_free(m, &soft_bufs[b]);
    free(soft_bufs);
    for (int64_t b = 0; caches && b < B; b++) kv_cache_free(&caches[b]);
    free(soft); free(caches); free(seqs); free(ids); free(mm); free(types); free(logits);
    return rc;
}

/* --adapters A,B,-,...: one adapter directory per row ("-" = none). */
static int forward_mixed(Model *m, const CliOptions *o, const SafeTensors *in) {
    enum { MAX_ROWS = 256 };
    LoraAdapter *ads[MAX_ROWS] = {0};
    LoraBinding binds[MAX_ROWS];
    const LoraBinding *rows[MAX_ROWS] = {0};
    memset(binds, 0, sizeof binds);
    char *list = strdup(o->adapters), *save = NULL;
    int n = 0, rc = !list;
    GfError err;
    for (char *d = list ? strtok_r(list, ",", &save) : NULL; d && !rc; d = strtok_r(NULL, ",", &save), n++) {
        if (n == MAX_ROWS) { fprintf(stderr, "gemmaforge forward: at most %d rows\n", MAX_ROWS); rc = 1; break; }
        if (strcmp(d, "-") == 0) continue;
        if (lora_load_dir(d, m, LORA_MAX_RANK, &ads[n], &err) || lora_bind(m, ads[n], &binds[n], &err)) {
            fprintf(stderr, "gemmaforge forward: the adapter of row %d (%s): %s\n", n, d, err.message);
            rc = 1;
        }
        rows[n] = &binds[n];
    }
    const StTensor *t = safetensors_find(in, "input_ids");
    if (!rc && (!t || t->n_dims != 2 || (int64_t)t->shape[0] != n)) {
        fprintf(stderr, "gemmaforge forward: --adapters names %d rows; input_ids must be [%d, T]\n", n, n);
        rc = 1;
    }
    if (!rc) rc = run_forward_mixed(m, rows, o, in);
    for (int i = 0; i < MAX_ROWS; i++) {
        lora_binding_free(&binds[i]);
        lora_free(ads[i]);
    }
    free(list);
    return rc;
}

static Model *open_model(const CliOptions *o, const char *cmd) {
    Model *m = NULL;
    GfError err;
    ModelOptions mo = {.device = o->device, .precision = o->precision, .n_threads = (int)o->threads, .quantize = o->quantize};
    if (model_open(o->model, &mo, &m, &err)) {
        fprintf(stderr, "gemmaforge %s: cannot load the model: %s\n", cmd, err.message);
        return NULL;
    }
    return m;
}

int cli_forward(int argc, char **argv) {
    CliOptions o;
    if (parse(argc, argv, &o) || !o.model || !o.inputs || !o.out) {
        fprintf(stderr, "usage: gemmaforge forward --model DIR [--adapter DIR | --adapters DIR|-,DIR|-,...] [--quantize nf4|none]\n"
                        "                          --inputs IN.safetensors --out OUT.safetensors [--hidden] [--device D] [--precision fp32|bf16] [--threads N]\n"
                        "  --adapters: one adapter per row of input_ids (- = the base model), all rows run as one batch\n");
        return 2;
    }
    gf_log_init(GF_LOG_WARN);
    SafeTensors in;
    GfError err;
    if (safetensors_open(o.inputs, "the inputs file", &in, &err)) {
        fprintf(stderr, "gemmaforge forward: %s\n", err.message);
        return 1;
    }
    Model *m = open_model(&o, "forward");
    LoraAdapter *a = NULL;
    LoraBinding lb = {0};
    int rc = !m;
    if (m && o.adapter && (lora_load_dir(o.adapter, m, LORA_MAX_RANK, &a, &err) || lora_bind(m, a, &lb, &err))) {
        fprintf(stderr, "gemmaforge forward: the adapter: %s\n", err.message);
        rc = 1;
    }
    if (!rc && o.adapters && (o.adapter || o.hidden)) {
        fprintf(stderr, "gemmaforge forward: --adapters goes without --adapter and --hidden\n");
        rc = 2;
    }
    if (!rc) rc = o.adapters ? forward_mixed(m, &o, &in) : run_forward(m, a ? &lb : NULL, &o, &in);
    lora_binding_free(&lb);
    lora_free(a);
    model_close(m);
    safetensors_close(&in);
    return rc;
}

int cli_generate(int argc, char **argv) {
    CliOptions o;
    if (parse(argc, argv, &o) || !o.model || !o.ids) {
        fprintf(stderr, "usage: gemmaforge generate --model DIR --ids 2,17,... [--max-new N] [--device D] [--precision fp32|bf16] [--threads N]\n");
        return 2;
    }
    gf_log_init(GF_LOG_WARN);
    int64_t n = 0, cap = (int64_t)strlen(o.ids) / 2 + 2;
    int32_t *ids = malloc((size_t)cap * sizeof *ids), *out = malloc((size_t)o.max_new * sizeof *out);
    for (const char *p = o.ids; ids && *p;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
            fprintf(stderr, "gemmaforge generate: --ids must be comma-separated token ids\n");
            free(ids); free(out);
            return 2;
        }
        ids[n++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    Model *m = n ? open_model(&o, "generate") : NULL;
    int rc = 1;
    GfError err;
    int64_t n_out = 0;
    if (m && model_generate_greedy(m, ids, n, o.max_new, out, &n_out, &err) == GF_OK) {
        printf("[");
        for (int64_t i = 0; i < n_out; i++) printf(i ? ", %d" : "%d", out[i]);
        printf("]\n");
        rc = 0;
    } else if (m) {
        fprintf(stderr, "gemmaforge generate: %s\n", err.message);
    }
    model_close(m);
    free(ids);
    free(out);
    return rc;
}

/* ---- preprocess ---------------------------------------------------------------- */

/* Reads and decodes an image file under the caps. */
static GfStatus load_image(const char *path, Image *img, GfError *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return gf_error_set(err, GF_NOT_FOUND, "file_not_found", NULL, "cannot open the image (%s)", strerror(errno));
    const ImageLimits lim = {20u << 20, 50000000};
    uint8_t *buf = malloc(lim.max_bytes + 1);
    size_t n = buf ? fread(buf, 1, lim.max_bytes + 1, f) : 0;
    fclose(f);
    if (!buf) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    GfStatus st = image_decode(buf, n, &lim, img, err);
    free(buf);
    return st;
}

int cli_preprocess(int argc, char **argv) {
    CliOptions o;
    if (parse(argc, argv, &o) || !o.image || !o.out) {
        fprintf(stderr, "usage: gemmaforge preprocess --image FILE [--max-soft-tokens 70|140|280|560|1120] --out OUT.safetensors\n");
        return 2;
    }
    Image img;
    GfError err;
    if (load_image(o.image, &img, &err)) {
        fprintf(stderr, "gemmaforge preprocess: %s\n", err.message);
        return 1;
    }
    PreprocessConfig cfg = {(int)o.max_soft_tokens, 16, 3};
    int64_t P = preprocess_max_patches(&cfg), n_real = 0, n_soft = 0;
    int32_t *pos = malloc((size_t)(P > 0 ? P : 1) * 2 * sizeof *pos);
    float *pixels = malloc((size_t)(P > 0 ? P : 1) * 768 * sizeof *pixels);
    int64_t *pos64 = malloc((size_t)(P > 0 ? P : 1) * 2 * sizeof *pos64);
    int rc = !pos || !pixels || !pos64;
    if (!rc && preprocess_image_f32(&cfg, &img, pixels, pos, &n_real, &n_soft, &err)) {
        fprintf(stderr, "gemmaforge preprocess: %s\n", err.message);
        rc = 1;
    }
    if (!rc) {
        for (int64_t i = 0; i < P * 2; i++) pos64[i] = pos[i];
        StWriteTensor out[2] = {{"pixel_values", ST_F32, 3, {1, (uint64_t)P, 768}, pixels},
                                {"image_position_ids", ST_I64, 3, {1, (uint64_t)P, 2}, pos64}};
        if (safetensors_write(o.out, out, 2, &err)) { fprintf(stderr, "gemmaforge preprocess: %s\n", err.message); rc = 1; }
        else printf("{\"width\": %d, \"height\": %d, \"patches\": %lld, \"soft_tokens\": %lld}\n", img.width, img.height,
                    (long long)n_real, (long long)n_soft);
    }
    image_free(&img);
    free(pos); free(pixels); free(pos64);
    return rc;
}

/* ---- tokenize ------------------------------------------------------------------ */

static void print_ids(const int32_t *ids, size_t n) {
    printf("{\"ids\": [");
    for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("]}\n");
}

/* One {"text": ...} per input line -> one {"ids": [...]} per output line. */
static int tokenize_jsonl(const Tokenizer *t, int add_special) {
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t n;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = 0;
    while ((n = getline(&line, &cap, stdin)) > 0) {
        lineno++;
        GfError err;
        cJSON *j = json_parse_strict(line, (size_t)n, "line", &err);
        const cJSON *text = j ? cJSON_GetObjectItemCaseSensitive(j, "text") : NULL;
        if (!cJSON_IsString(text)) {
            fprintf(stderr, "gemmaforge tokenize: line %zu: expected {\"text\": ...}%s%s\n", lineno, j ? "" : ": ", j ? "" : err.message);
            rc = 1;
        } else if (tokenizer_encode(t, text->valuestring, strlen(text->valuestring), add_special, 1, &ids, &n_ids, &err)) {
            fprintf(stderr, "gemmaforge tokenize: line %zu: %s\n", lineno, err.message);
            rc = 1;
        } else {
            print_ids(ids, n_ids);
        }
        cJSON_Delete(j);
    }
    free(line);
    free(ids);
    return rc;
}

int cli_tokenize(int argc, char **argv) {
    const char *model = NULL, *text = NULL;
    int jsonl = 0, add_special = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) model = argv[++i];
        else if (strcmp(argv[i], "--jsonl") == 0) jsonl = 1;
        else if (strcmp(argv[i], "--add-special") == 0) add_special = 1;
        else if (!text && argv[i][0] != '-') text = argv[i];
        else { text = NULL; model = NULL; break; }
    }
    if (!model || (!text && !jsonl)) {
        fprintf(stderr, "usage: gemmaforge tokenize --model DIR [--add-special] TEXT | --jsonl < IN.jsonl\n");
        return 2;
    }
    Tokenizer *t = NULL;
    GfError err;
    if (tokenizer_load_dir(model, &t, &err)) {
        fprintf(stderr, "gemmaforge tokenize: %s\n", err.message);
        return 1;
    }
    int rc = 0;
    if (jsonl) rc = tokenize_jsonl(t, add_special);
    else {
        int32_t *ids = NULL;
        size_t n = 0;
        if (tokenizer_encode(t, text, strlen(text), add_special, 1, &ids, &n, &err)) {
            fprintf(stderr, "gemmaforge tokenize: %s\n", err.message);
            rc = 1;
        } else {
            print_ids(ids, n);
        }
        free(ids);
    }
    tokenizer_free(t);
    return rc;
}

/* ---- infer ----------------------------------------------------------------------- */

#define INFER_MAX_IMAGES 16

typedef struct {
    const char *model, *adapter, *prompt, *system, *images[INFER_MAX_IMAGES];
    const char *device;        /* NULL: the default (model.h) */
    const char *precision;     /* NULL: the default (model.h) */
    int n_images, think, json;
    long max_tokens, threads, budget;
    ModelQuant quantize;
} InferOptions;

static int parse_infer(int argc, char **argv, InferOptions *o) {
    memset(o, 0, sizeof *o);
    o->max_tokens = 256;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--think") == 0) { o->think = 1; continue; }
        if (strcmp(a, "--json") == 0) { o->json = 1; continue; }
        if (!v) { fprintf(stderr, "gemmaforge infer: %s needs a value\n", a); return -1; }
        char *end = NULL;
        if (strcmp(a, "--model") == 0) o->model = v;
        else if (strcmp(a, "--prompt") == 0) o->prompt = v;
        else if (strcmp(a, "--adapter") == 0) o->adapter = v;
        else if (strcmp(a, "--system") == 0) o->system = v;
        else if (strcmp(a, "--quantize") == 0 && cli_parse_quantize(v, &o->quantize) == 0) {}
        else if (strcmp(a, "--image") == 0) {
            if (o->n_images == INFER_MAX_IMAGES) { fprintf(stderr, "gemmaforge infer: at most %d images\n", INFER_MAX_IMAGES); return -1; }
            o->images[o->n_images++] = v;
        }
        else if (strcmp(a, "--max-tokens") == 0 && (o->max_tokens = strtol(v, &end, 10), !*end) && o->max_tokens > 0 && o->max_tokens <= 1000000) {}
        else if (strcmp(a, "--max-soft-tokens") == 0 && (o->budget = strtol(v, &end, 10), !*end) && o->budget > 0) {}
        else if (strcmp(a, "--device") == 0 && cli_parse_device(v) == 0) o->device = v;
        else if (strcmp(a, "--precision") == 0 && cli_parse_precision(v) == 0) o->precision = v;
        else if (strcmp(a, "--threads") == 0 && (o->threads = strtol(v, &end, 10), !*end) && o->threads >= 0 && o->threads <= 1024) {}
        else { fprintf(stderr, "gemmaforge infer: unknown option or bad value: %s %s\n", a, v); return -1; }
        i++;
    }
    return 0;
}

typedef struct {
    int json;
    char *text;               /* --json: the answer so far */
    size_t len, cap;
} InferOut;

static int print_piece(void *user, const char *text, size_t len) {
    InferOut *out = user;
    if (!out->json) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
        return 0;
    }
    if (out->len + len + 1 > out->cap) {
        size_t cap = (out->len + len + 1) * 2;
        char *t = realloc(out->text, cap);
        if (!t) return 1;
        out->text = t;
        out->cap = cap;
    }
    memcpy(out->text + out->len, text, len);
    out->text[out->len += len] = '\0';
    return 0;
}

static cJSON *ids_json(const int32_t *ids, int64_t n) {
    cJSON *a = cJSON_CreateArray();
    for (int64_t i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

/* --json: one object with the prompt and answer ids, the text and the counts. */
static void print_infer_json(const Prompt *pr, const GenResult *res, const InferOut *out) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "prompt_ids", ids_json(pr->ids, pr->n));
    cJSON_AddItemToObject(o, "output_ids", ids_json(res->ids, res->n_generated));
    cJSON_AddStringToObject(o, "text", out->text ? out->text : "");
    cJSON_AddStringToObject(o, "finish_reason", res->finish == FINISH_STOP ? "stop" : "length");
    cJSON_AddNumberToObject(o, "prompt_tokens", (double)res->n_prompt);
    cJSON_AddNumberToObject(o, "completion_tokens", (double)res->n_generated);
    char *s = cJSON_PrintUnformatted(o);
    if (s) printf("%s\n", s);
    free(s);
    cJSON_Delete(o);
}

/* Decodes every --image before the model is loaded, so a bad file fails fast. */
static int load_images(const InferOptions *o, Image *imgs) {
    for (int k = 0; k < o->n_images; k++) {
        GfError err;
        if (load_image(o->images[k], &imgs[k], &err)) {
            fprintf(stderr, "gemmaforge infer: %s: %s\n", o->images[k], err.message);
            for (int j = 0; j < k; j++) image_free(&imgs[j]);
            return 1;
        }
    }
    return 0;
}

int cli_infer(int argc, char **argv) {
    InferOptions o;
    if (parse_infer(argc, argv, &o) || !o.model || !o.prompt) {
        fprintf(stderr, "usage: gemmaforge infer --model DIR [--adapter DIR] [--quantize nf4|none] [--image F]... --prompt TEXT [--system TEXT] [--max-tokens N]\n"
                        "                        [--max-soft-tokens 70|140|280|560|1120] [--think] [--json] [--device D] [--precision fp32|bf16] [--threads N]\n");
        return 2;
    }
    gf_log_init(GF_LOG_WARN);
    Image imgs[INFER_MAX_IMAGES];
    if (load_images(&o, imgs)) return 1;
    Pipeline *p = NULL;
    GfError err;
    ModelOptions mo = {.device = o.device, .precision = o.precision, .n_threads = (int)o.threads, .quantize = o.quantize};
    int rc = 1;
    LoraAdapter *adapter = NULL;
    LoraBinding lb = {0};
    if (pipeline_open(o.model, &mo, &p, &err)) {
        fprintf(stderr, "gemmaforge infer: cannot load the model: %s\n", err.message);
    } else if (o.adapter && (lora_load_dir(o.adapter, p->model, LORA_MAX_RANK, &adapter, &err) || lora_bind(p->model, adapter, &lb, &err))) {
        fprintf(stderr, "gemmaforge infer: the adapter: %s\n", err.message);
    } else {
        ChatPart parts[INFER_MAX_IMAGES + 1];
        for (int k = 0; k < o.n_images; k++) parts[k] = (ChatPart){.is_image = 1};
        parts[o.n_images] = (ChatPart){.text = o.prompt};
        ChatPart sys_part = {.text = o.system};
        ChatMessage msgs[2] = {{.role = CHAT_SYSTEM, .parts = &sys_part, .n_parts = 1, .content_is_string = 1},
                               {.role = CHAT_USER, .parts = parts, .n_parts = (size_t)o.n_images + 1,
                                .content_is_string = o.n_images == 0}};
        Prompt pr;
        InferOut out = {.json = o.json};
        GenResult res = {.ids = malloc((size_t)o.max_tokens * sizeof(int32_t))};
        if (pipeline_prompt(p, adapter ? &lb : NULL, msgs + !o.system, 1 + !!o.system, imgs, (size_t)o.n_images, (int)o.budget, o.think, &pr, &err)) {
            fprintf(stderr, "gemmaforge infer: %s%s%s\n", err.param[0] ? err.param : "", err.param[0] ? ": " : "", err.message);
        } else if (!res.ids || pipeline_generate(p, &pr, o.max_tokens, print_piece, &out, &res, &err)) {
            fprintf(stderr, "\ngemmaforge infer: %s\n", res.ids ? err.message : "out of memory");
            prompt_free(&pr);
        } else {
            if (o.json) print_infer_json(&pr, &res, &out);
            else printf("\n");
            fprintf(stderr, "[%lld prompt tokens in %.2f s; %lld generated in %.2f s (%.1f tokens/s); finish: %s]\n",
                    (long long)res.n_prompt, res.prefill_s, (long long)res.n_generated, res.decode_s,
                    res.decode_s > 0 ? (double)res.n_generated / res.decode_s : 0.0, res.finish == FINISH_STOP ? "stop" : "length");
            prompt_free(&pr);
            rc = 0;
        }
        free(res.ids);
        free(out.text);
    }
    lora_binding_free(&lb);
    lora_free(adapter);
    pipeline_close(p);
    for (int k = 0; k < o.n_images; k++) image_free(&imgs[k]);
    return rc;
}
