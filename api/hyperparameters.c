/* hyperparameters.c - validation and defaults of fine-tuning hyperparameters. */
#include "hyperparameters.h"

#include <stdio.h>
#include <string.h>

#include "json_util.h"

static const char *const TARGET_NAMES[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj", NULL};

static GfStatus parse_targets(const JsonCtx *c, JobParams *p, cJSON *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->obj, "target_modules");
    JsonCtx tc = *c;
    if (!v || cJSON_IsNull(v) || (cJSON_IsString(v) && strcmp(v->valuestring, "all-linear") == 0)) {
        cJSON_AddStringToObject(out, "target_modules", "all-linear");
        p->targets[0] = "all-linear";
        p->n_targets = 1;
        return GF_OK;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0 || cJSON_GetArraySize(v) > 7)
        return gf_error_set(c->err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.target_modules",
                            "'hyperparameters.target_modules' must be \"all-linear\" or a list of module names");
    cJSON *arr = cJSON_AddArrayToObject(out, "target_modules");
    for (const cJSON *e = v->child; e; e = e->next) {
        const char *const *k = TARGET_NAMES;
        while (*k && !(cJSON_IsString(e) && strcmp(*k, e->valuestring) == 0)) k++;
        if (!*k)
            return gf_error_set(tc.err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.target_modules",
                                "'hyperparameters.target_modules' entries must be among q_proj, k_proj, v_proj, "
                                "o_proj, gate_proj, up_proj, down_proj");
        for (const cJSON *d = arr->child; d; d = d->next)
            if (strcmp(d->valuestring, *k) == 0)
                return gf_error_set(tc.err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.target_modules",
                                    "'hyperparameters.target_modules' lists '%s' twice", *k);
        cJSON_AddItemToArray(arr, cJSON_CreateString(*k));
        p->targets[p->n_targets++] = *k;
    }
    return GF_OK;
}

/* Validates every hyperparameter and writes the normalized set (defaults
 * filled in) to *out. */
GfStatus hyperparameters_parse(const cJSON *h, int max_rank, JobParams *p, cJSON **out, GfError *err) {
    static const cJSON empty_obj = {.type = cJSON_Object};
    JsonCtx c = {h ? h : &empty_obj, "hyperparameters", "invalid_hyperparameter", err};
    static const char *const keys[] = {
        "epochs", "learning_rate", "lr_scheduler", "warmup_ratio", "batch_size",
        "gradient_accumulation_steps", "lora_rank", "lora_alpha", "lora_dropout", "use_rslora",
        "target_modules", "quantization", "gradient_checkpointing", "max_seq_len", "eval_every",
        "save_every", "seed", NULL};
    static const char *const schedulers[] = {"cosine", "linear", "constant", NULL};
    static const char *const quant[] = {"nf4", "none", NULL};
    int64_t epochs, bs, accum, rank, seq, eval_every, save_every, seed;
    double lr, warmup, alpha, dropout;
    const char *sched, *q;
    int rslora, ckpt;
    if (json_only_keys(&c, keys) ||
        json_get_int(&c, "epochs", 0, 1, 1000, 3, &epochs) ||
        json_get_number(&c, "learning_rate", 0, 0, 1, 1.0, 5e-5, &lr) ||
        json_get_enum(&c, "lr_scheduler", schedulers, "cosine", &sched) ||
        json_get_number(&c, "warmup_ratio", 0, 0, 0, 0.5, 0.03, &warmup) ||
        json_get_int(&c, "batch_size", 0, 1, 1024, 2, &bs) ||
        json_get_int(&c, "gradient_accumulation_steps", 0, 1, 1024, 4, &accum) ||
        json_get_int(&c, "lora_rank", 0, 1, max_rank, 64, &rank) ||
        json_get_number(&c, "lora_alpha", 0, 0, 1, 4096, 64, &alpha) ||
        json_get_number(&c, "lora_dropout", 0, 0, 0, 0.9, 0.05, &dropout) ||
        json_get_bool(&c, "use_rslora", 0, &rslora) ||
        json_get_enum(&c, "quantization", quant, "nf4", &q) ||
        json_get_bool(&c, "gradient_checkpointing", 1, &ckpt) ||
        json_get_int(&c, "max_seq_len", 0, 16, HP_MAX_SEQ_LEN, 2048, &seq) ||
        json_get_int(&c, "eval_every", 0, 0, 1000000, 0, &eval_every) ||
        json_get_int(&c, "save_every", 0, 1, 1000000, 100, &save_every) ||
        json_get_int(&c, "seed", 0, 0, 2147483647, 42, &seed))
        return GF_INVALID;
    if (!ckpt)
        return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.gradient_checkpointing",
                            "'hyperparameters.gradient_checkpointing' false is not supported: this engine always "
                            "recomputes one layer at a time in the backward pass");
    memset(p, 0, sizeof *p);
    p->train = (TrainConfig){.epochs = epochs, .batch_size = bs, .grad_accum = accum, .lr = lr, .warmup_ratio = warmup,
                             .weight_decay = 0.0, .max_grad_norm = 1.0, .seed = (uint64_t)seed,
                             .schedule = strcmp(sched, "cosine") == 0 ? SCHED_COSINE
                                         : strcmp(sched, "linear") == 0 ? SCHED_LINEAR : SCHED_CONSTANT};
    p->lora_rank = (int)rank;
    p->lora_alpha = alpha;
    p->lora_dropout = dropout;
    p->use_rslora = rslora;
    p->quantization = strcmp(q, "nf4") == 0 ? MODEL_QUANT_NF4 : MODEL_QUANT_NONE;
    p->gradient_checkpointing = ckpt;
    p->max_seq_len = seq;
    p->eval_every = eval_every;
    p->save_every = save_every;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "epochs", (double)epochs);
    cJSON_AddNumberToObject(o, "learning_rate", lr);
    cJSON_AddStringToObject(o, "lr_scheduler", sched);
    cJSON_AddNumberToObject(o, "warmup_ratio", warmup);
    cJSON_AddNumberToObject(o, "batch_size", (double)bs);
    cJSON_AddNumberToObject(o, "gradient_accumulation_steps", (double)accum);
    cJSON_AddNumberToObject(o, "lora_rank", (double)rank);
    cJSON_AddNumberToObject(o, "lora_alpha", alpha);
    cJSON_AddNumberToObject(o, "lora_dropout", dropout);
    cJSON_AddBoolToObject(o, "use_rslora", rslora);
    if (parse_targets(&c, p, o)) { cJSON_Delete(o); return GF_INVALID; }
    cJSON_AddStringToObject(o, "quantization", q);
    cJSON_AddBoolToObject(o, "gradient_checkpointing", ckpt);
    cJSON_AddNumberToObject(o, "max_seq_len", (double)seq);
    cJSON_AddNumberToObject(o, "eval_every", (double)eval_every);
    cJSON_AddNumberToObject(o, "save_every", (double)save_every);
    cJSON_AddNumberToObject(o, "seed", (double)seed);
    if (out) *out = o;
    else cJSON_Delete(o);
    return GF_OK;
}

GfStatus hyperparameters_from_text(const char *text, int max_rank, JobParams *out, GfError *err) {
    cJSON *h = cJSON_Parse(text);
    if (!cJSON_IsObject(h)) {
        cJSON_Delete(h);
        return gf_error_set(err, GF_FORMAT, "invalid_hyperparameter", "hyperparameters", "the stored hyperparameters do not parse");
    }
    GfStatus st = hyperparameters_parse(h, max_rank, out, NULL, err);
    cJSON_Delete(h);
    return st;
}
