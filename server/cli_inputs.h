/* cli_inputs.h - what the engine's parity commands (forward, lora-step)
 * read from an inputs file, named as transformers' processors name them:
 * integer rows (input_ids, attention_mask, mm_token_type_ids, labels) and
 * images (pixel_values F32 in [0, 1], or pixel_values_u8 read as u8 / 255,
 * with image_position_ids), and the --quantize option they share.
 *
 * Each reader prints what is wrong, prefixed with "gemmaforge <cmd>:", and
 * reports failure; results are malloc'd and owned by the caller.
 */
#ifndef GF_CLI_INPUTS_H
#define GF_CLI_INPUTS_H

#include <stdint.h>

#include "model.h"
#include "safetensors.h"

/* An I64 or I32 [B, T] tensor as int32 (values outside int32: -1). B and T
 * are set from the first tensor read and must match afterwards (0 = not yet).
 * NULL when absent (*bad set if required) or malformed (*bad set). */
int32_t *cli_read_ids(const SafeTensors *st, const char *cmd, const char *name, int64_t *B, int64_t *T, int required,
                      int *bad);

typedef struct {
    float *pixels;            /* [n_images, n_patches, patch_len] */
    int32_t *positions;       /* [n_images, n_patches, 2]; out-of-range values become -2 (refused by the tower) */
    int64_t n_images, n_patches, patch_len;
} CliImages;

/* The images of st, if any (n_images 0 when there are none). Returns 0, or
 * 1 after printing why. */
int cli_read_images(const SafeTensors *st, const char *cmd, CliImages *out);
void cli_images_free(CliImages *im);

/* "nf4" or "none" into *q; -1 for anything else. */
int cli_parse_quantize(const char *v, ModelQuant *q);
/* 0 when v names a device (cpu, guarded, cuda, cuda:N), else -1 with the
 * reason on stderr. */
int cli_parse_device(const char *v);
/* 0 when v is a --precision value (fp32, bf16), else -1 (said so). */
int cli_parse_precision(const char *v);

#endif
