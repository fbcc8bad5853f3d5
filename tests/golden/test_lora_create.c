/* test_lora_create.c - new adapters select the modules PEFT selects: the
 * golden adapters' module sets and trainable counts are reproduced from
 * their target_modules (a suffix list on dense, ple and moe; all-linear on
 * dense, the vision tower included), with PEFT's default initialization. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "lora.h"
#include "model.h"

static int has_module(const LoraAdapter *a, const char *name) {
    for (size_t i = 0; i < a->n_pairs; i++)
        if (strcmp(a->pairs[i].module, name) == 0) return 1;
    return 0;
}

static void check_case(const char *variant, const char *kind, const char *const *targets, size_t n_targets, long n_trainable) {
    char dir[512], adapter[600];
    snprintf(dir, sizeof dir, GF_FIXTURES "/%s", variant);
    snprintf(adapter, sizeof adapter, "%s/%s/adapter_init", dir, kind);
    Model *m = NULL;
    LoraAdapter *ref = NULL, *a = NULL, *b = NULL;
    GfError err;
    ModelOptions mo = {.n_threads = 1, .quantize = MODEL_QUANT_NONE};
    CHECK_STATUS(model_open(dir, &mo, &m, &err), GF_OK, err);
    if (!m) return;
    CHECK_STATUS(lora_load_dir(adapter, m, LORA_MAX_RANK, &ref, &err), GF_OK, err);
    CHECK_STATUS(lora_create(m, targets, n_targets, 4, 8.0, 0, 42, &a, &err), GF_OK, err);
    if (ref && a) {
        long params = 0;
        int same = a->n_pairs == ref->n_pairs, init_ok = 1;
        for (size_t i = 0; i < a->n_pairs; i++) {
            const LoraPair *p = &a->pairs[i];
            same &= has_module(ref, p->module);
            params += (long)(p->rank * (p->in + p->out));
            float bound = 1.0f / sqrtf((float)p->in), mx = 0;
            for (int64_t j = 0; j < p->rank * p->in; j++) mx = fmaxf(mx, fabsf(p->A[j]));
            for (int64_t j = 0; j < p->out * p->rank; j++) init_ok &= p->B[j] == 0.0f;
            init_ok &= mx <= bound && mx > 0.5f * bound;
        }
        CHECK(same, "%s/%s: the same %zu modules as PEFT's adapter (we have %zu)", variant, kind, ref->n_pairs, a->n_pairs);
        CHECK(params == n_trainable, "%s/%s: %ld trainable parameters, PEFT %ld", variant, kind, params, n_trainable);
        CHECK(init_ok, "%s/%s: A uniform within 1/sqrt(in), B zero", variant, kind);
        CHECK(a->scale == 2.0f, "scale alpha / r");
        CHECK_STATUS(lora_create(m, targets, n_targets, 4, 8.0, 0, 42, &b, &err), GF_OK, err);
        CHECK(b && memcmp(b->pairs[0].A, a->pairs[0].A, (size_t)(4 * a->pairs[0].in) * sizeof(float)) == 0, "same seed, same A");
    }
    lora_free(ref);
    lora_free(a);
    lora_free(b);
    model_close(m);
}

int main(void) {
    const char *lm[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    const char *all[] = {"all-linear"};
    check_case("dense", "lora_lm", lm, 7, 24832);
    check_case("dense", "lora_all", all, 1, 32768);
    check_case("ple", "lora_lm", lm, 7, 27392);
    check_case("moe", "lora_lm", lm, 7, 24832);
    /* errors name the target */
    Model *m = NULL;
    LoraAdapter *a = NULL;
    GfError err;
    ModelOptions mo = {.n_threads = 1, .quantize = MODEL_QUANT_NONE};
    CHECK_STATUS(model_open(GF_FIXTURES "/dense", &mo, &m, &err), GF_OK, err);
    const char *bad[] = {"q_proj", "qkv_proj"};
    CHECK(lora_create(m, bad, 2, 4, 8.0, 0, 1, &a, &err) == GF_INVALID && strstr(err.message, "'qkv_proj'") && !a,
          "an unknown target module is named: %s", err.message);
    CHECK(lora_create(m, lm, 7, 0, 8.0, 0, 1, &a, &err) == GF_INVALID && !a, "rank 0 refused");
    model_close(m);
    return check_done("test_lora_create");
}
