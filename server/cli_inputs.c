/* cli_inputs.c - the inputs files of the parity commands (see cli_inputs.h). */
#include "cli_inputs.h"

#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t *cli_read_ids(const SafeTensors *st, const char *cmd, const char *name, int64_t *B, int64_t *T, int required,
                      int *bad) {
    const StTensor *t = safetensors_find(st, name);
    *bad = 0;
    if (!t) {
        if (required) { fprintf(stderr, "gemmaforge %s: the inputs have no '%s'\n", cmd, name); *bad = 1; }
        return NULL;
    }
    if ((t->dtype != ST_I64 && t->dtype != ST_I32) || t->n_dims != 2 || t->shape[0] == 0 || t->shape[1] == 0 ||
        (*B && (t->shape[0] != (uint64_t)*B || t->shape[1] != (uint64_t)*T))) {
        fprintf(stderr, "gemmaforge %s: '%s' must be I64 [B, T] like input_ids\n", cmd, name);
        *bad = 1;
        return NULL;
    }
    *B = (int64_t)t->shape[0];
    *T = (int64_t)t->shape[1];
    int32_t *out = malloc((size_t)(*B * *T) * sizeof *out);
    if (!out) *bad = 1;
    for (int64_t i = 0; out && i < *B * *T; i++) {
        int64_t v = 0;
        if (t->dtype == ST_I64) memcpy(&v, t->data + 8 * i, 8);
        else { int32_t w; memcpy(&w, t->data + 4 * i, 4); v = w; }
        out[i] = v < INT32_MIN || v > INT32_MAX ? -1 : (int32_t)v;
    }
    return out;
}

void cli_images_free(CliImages *im) {
    free(im->pixels);
    free(im->positions);
    memset(im, 0, sizeof *im);
}

int cli_read_images(const SafeTensors *st, const char *cmd, CliImages *out) {
    memset(out, 0, sizeof *out);
    const StTensor *pf = safetensors_find(st, "pixel_values"), *pu = safetensors_find(st, "pixel_values_u8");
    const StTensor *pos = safetensors_find(st, "image_position_ids"), *px = pf ? pf : pu;
    if (!px) return 0;
    if ((pf && pf->dtype != ST_F32) || (pu && pu->dtype != ST_U8) || px->n_dims != 3 || !pos || pos->dtype != ST_I64 ||
        pos->n_dims != 3 || pos->shape[0] != px->shape[0] || pos->shape[1] != px->shape[1] || pos->shape[2] != 2) {
        fprintf(stderr, "gemmaforge %s: images need pixel_values F32 (or pixel_values_u8 U8) [N, P, 3p^2] and "
                        "image_position_ids I64 [N, P, 2]\n", cmd);
        return 1;
    }
    out->n_images = (int64_t)px->shape[0];
    out->n_patches = (int64_t)px->shape[1];
    out->patch_len = (int64_t)px->shape[2];
    out->pixels = malloc(px->n_elements * sizeof(float));
    out->positions = malloc(pos->n_elements * sizeof(int32_t));
    if (!out->pixels || !out->positions) {
        fprintf(stderr, "gemmaforge %s: out of memory for the images\n", cmd);
        cli_images_free(out);
        return 1;
    }
    for (uint64_t i = 0; i < px->n_elements; i++) {
        if (pf) memcpy(&out->pixels[i], pf->data + 4 * i, 4);
        else out->pixels[i] = (float)pu->data[i] / 255.0f;
    }
    for (uint64_t i = 0; i < pos->n_elements; i++) {
        int64_t v;
        memcpy(&v, pos->data + 8 * i, 8);
        out->positions[i] = v < -1 || v > 1000000 ? -2 : (int32_t)v;
    }
    return 0;
}

int cli_parse_device(const char *v) {
    KnDeviceKind kind;
    int index;
    GfError err;
    if (kn_backend_parse(v, &kind, &index, &err) == GF_OK) return 0;
    fprintf(stderr, "gemmaforge: --device: %s\n", err.message);
    return -1;
}

int cli_parse_precision(const char *v) {
    KnPrecision p;
    GfError err;
    if (kn_precision_parse(v, &p, &err) == GF_OK) return 0;
    fprintf(stderr, "gemmaforge: --precision: %s\n", err.message);
    return -1;
}

int cli_parse_quantize(const char *v, ModelQuant *q) {
    if (strcmp(v, "nf4") == 0) *q = MODEL_QUANT_NF4;
    else if (strcmp(v, "none") == 0) *q = MODEL_QUANT_NONE;
    else return -1;
    return 0;
}
