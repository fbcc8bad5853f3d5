/* cli_export.c - `gemmaforge merge`. */
#include "cli_export.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_export.h"
#include "merge.h"
#include "qlora_gap.h"
#include "safetensors.h"

static int usage(void) {
    fprintf(stderr,
            "usage: gemmaforge merge --model DIR --adapter DIR --out DIR [--dtype bf16|f16|f32] [--max-shard-bytes N]\n"
            "                        [--qlora-check FILE.jsonl [--qlora-images TAR] [--qlora-examples N]]\n"
            "  writes the base model with the adapter merged in (W + scale * B A, rounded once) as a new model\n"
            "  directory: the base's tensor names, shapes and dtypes (or --dtype for every floating tensor),\n"
            "  shards of at most N bytes (default 5 GB) with model.safetensors.index.json, and the base's\n"
            "  config, tokenizer, chat template and processor files. OUT must not exist.\n"
            "  --qlora-check: then measures how far the merged model's logits are from the NF4 base + adapter\n"
            "  (what QLoRA trained) on the N shortest examples of the dataset (default 4), into \"qlora_gap\".\n");
    return 2;
}

static int parse_dtype(const char *v, int *out) {
    if (strcmp(v, "bf16") == 0) *out = ST_BF16;
    else if (strcmp(v, "f16") == 0) *out = ST_F16;
    else if (strcmp(v, "f32") == 0) *out = ST_F32;
    else return -1;
    return 0;
}

/* A line on stderr at every further tenth of the bytes. */
static int progress(void *ctx, uint64_t done, uint64_t total) {
    int *last = ctx, tenth = total ? (int)(done * 10 / total) : 10;
    if (tenth > *last) {
        *last = tenth;
        fprintf(stderr, "gemmaforge: %d%% (%llu of %llu bytes)\n", tenth * 10, (unsigned long long)done,
                (unsigned long long)total);
    }
    return 0;
}

/* The qlora_gap object of the result line. */
static void print_gap(const QloraGap *g) {
    printf(",\"qlora_gap\":{\"examples\":%d,\"rows\":%lld,\"rel_l2\":%.9g,\"max_abs\":%.9g,\"top1_agreement\":%.9g}",
           g->n_examples, (long long)g->n_rows, g->rel_l2, g->max_abs, g->top1_agreement);
}

int cli_merge(int argc, char **argv) {
    MergeOptions o = {.dtype = -1};
    QloraGapSpec q = {.max_examples = 4, .image_limits = {20u << 20, 50000000}};
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "gemmaforge merge: %s needs a value\n", a); return usage(); }
        char *end;
        long n;
        if (strcmp(a, "--model") == 0) o.model_dir = v;
        else if (strcmp(a, "--qlora-check") == 0) q.jsonl = v;
        else if (strcmp(a, "--qlora-images") == 0) q.tar = v;
        else if (strcmp(a, "--qlora-examples") == 0 && (n = strtol(v, &end, 10), !*end) && n >= 1 && n <= 1000)
            q.max_examples = (int)n;
        else if (strcmp(a, "--adapter") == 0) o.adapter_dir = v;
        else if (strcmp(a, "--out") == 0) o.out_dir = v;
        else if (strcmp(a, "--dtype") == 0 && parse_dtype(v, &o.dtype) == 0) {}
        else if (strcmp(a, "--max-shard-bytes") == 0 && (o.max_shard_bytes = strtoull(v, &end, 10), !*end) &&
                 o.max_shard_bytes > 0 && v[0] != '-') {}
        else { fprintf(stderr, "gemmaforge merge: unknown option or bad value: %s %s\n", a, v); return usage(); }
        i++;
    }
    if (!o.model_dir || !o.adapter_dir || !o.out_dir || (q.tar && !q.jsonl)) return usage();
    int last = 0;
    o.progress = progress;
    o.ctx = &last;
    MergeReport r;
    GfError err;
    if (merge_adapter(&o, &r, &err)) {
        fprintf(stderr, "gemmaforge merge: %s\n", err.message);
        return 1;
    }
    QloraGap gap;
    if (q.jsonl) {
        q.base_dir = o.model_dir;
        q.adapter_dir = o.adapter_dir;
        q.merged_dir = o.out_dir;
        if (qlora_gap_measure(&q, &gap, &err)) {
            fprintf(stderr, "gemmaforge merge: the merged model is written to %s, but its QLoRA check failed: %s\n",
                    o.out_dir, err.message);
            return 1;
        }
    }
    printf("{\"tensors\":%llu,\"merged\":%llu,\"bytes\":%llu,\"shards\":%d,\"files\":%d,\"max_abs_delta\":%.9g,"
           "\"unchanged_elements\":%llu",
           (unsigned long long)r.n_tensors, (unsigned long long)r.n_merged, (unsigned long long)r.n_bytes, r.n_shards,
           r.n_files, r.max_abs_delta, (unsigned long long)r.n_unchanged);
    if (q.jsonl) print_gap(&gap);
    printf("}\n");
    return 0;
}

static int usage_gguf(void) {
    fprintf(stderr,
            "usage: gemmaforge export-gguf --model DIR [--adapter DIR [--lora-only]] --out FILE [--type f16|bf16|f32|q8_0|q4_0]\n"
            "  writes the text model (with the adapter merged in) as one GGUF file for llama.cpp's gemma4\n"
            "  architecture, with the tokenizer and chat template; default type f16. With --lora-only, the\n"
            "  adapter alone (f16 or f32) for llama.cpp's --lora over the base's GGUF. FILE must not exist.\n");
    return 2;
}

int cli_export_gguf(int argc, char **argv) {
    GgufExportOptions o = {.type = GGML_F16};
    int lora_only = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--lora-only") == 0) { lora_only = 1; continue; }
        if (!v) { fprintf(stderr, "gemmaforge export-gguf: %s needs a value\n", a); return usage_gguf(); }
        if (strcmp(a, "--model") == 0) o.model_dir = v;
        else if (strcmp(a, "--adapter") == 0) o.adapter_dir = v;
        else if (strcmp(a, "--out") == 0) o.out_path = v;
        else if (strcmp(a, "--type") == 0 && ggml_type_from_name(v, &o.type) == 0) {}
        else { fprintf(stderr, "gemmaforge export-gguf: unknown option or bad value: %s %s\n", a, v); return usage_gguf(); }
        i++;
    }
    if (!o.model_dir || !o.out_path) return usage_gguf();
    int last = 0;
    o.progress = progress;
    o.ctx = &last;
    GgufExportReport r;
    GfError err;
    if (lora_only && !o.adapter_dir) return usage_gguf();
    if ((lora_only ? gguf_export_lora : gguf_export)(&o, &r, &err)) {
        fprintf(stderr, "gemmaforge export-gguf: %s\n", err.message);
        return 1;
    }
    printf("{\"tensors\":%llu,\"merged\":%llu,\"bytes\":%llu,\"tokens\":%llu,\"type\":\"%s\"}\n",
           (unsigned long long)r.n_tensors, (unsigned long long)r.n_merged, (unsigned long long)r.n_bytes,
           (unsigned long long)r.n_tokens, ggml_type_name(o.type));
    return 0;
}
