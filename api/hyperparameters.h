/* hyperparameters.h - the fine-tuning hyperparameters (PRODUCT.md, REST API):
 * one validator for the REST API, the job worker and `gemmaforge train`, so
 * a value is accepted or refused with the same message wherever it comes
 * from.
 *
 * hyperparameters_parse checks every key of a JSON object (unknown keys,
 * types and ranges refused as invalid_hyperparameter naming the field),
 * fills the defaults, and gives both the C struct and the normalized JSON the
 * job row stores. hyperparameters_from_text reads that stored text back.
 * Defaults: epochs 3, learning_rate 5e-5, cosine, warmup_ratio 0.03,
 * batch_size 2, gradient_accumulation_steps 4, lora_rank 64, lora_alpha 64,
 * lora_dropout 0.05, use_rslora false, all-linear, nf4, gradient_checkpointing
 * true, max_seq_len 2048, eval_every 0 (never), save_every 100, seed 42.
 * Optimizer settings not exposed: AdamW betas (0.9, 0.999), eps 1e-8,
 * weight decay 0, clipping at global norm 1.0 (transformers' Trainer defaults).
 *
 * Thread-safe; JobParams holds no pointers but to static strings.
 */
#ifndef GF_HYPERPARAMETERS_H
#define GF_HYPERPARAMETERS_H

#include <cJSON.h>

#include "base.h"
#include "model.h"
#include "trainer.h"

#define HP_MAX_TARGETS 8
#define HP_MAX_SEQ_LEN 131072      /* the largest max_seq_len a job may ask for */

typedef struct {
    TrainConfig train;              /* epochs, lr, schedule, warmup, batch, accumulation, seed */
    int lora_rank;
    double lora_alpha;
    double lora_dropout;            /* probability, [0, 0.9] */
    int use_rslora;
    const char *targets[HP_MAX_TARGETS]; /* "all-linear" alone, or module names */
    size_t n_targets;
    ModelQuant quantization;
    int gradient_checkpointing;     /* always on in this engine; false is refused */
    int64_t max_seq_len;            /* tokens */
    int64_t eval_every;             /* steps, 0 = never */
    int64_t save_every;             /* steps */
} JobParams;

/* h NULL means every default. normalized may be NULL. */
GfStatus hyperparameters_parse(const cJSON *h, int max_rank, JobParams *out, cJSON **normalized, GfError *err);
GfStatus hyperparameters_from_text(const char *text, int max_rank, JobParams *out, GfError *err);

#endif
