/* qlora_gap.h - how far a merged checkpoint's logits are from the model an
 * adapter was trained on with QLoRA: the base quantized to NF4 with the
 * adapter applied. Merging adds B A to the base's bf16 weights (what PEFT
 * and Unsloth do), not to their NF4 quantization, so the merged model is
 * not exactly the trained one; this says by how much, on a few examples of
 * a dataset (the job's own), text and images.
 *
 * Both models run every position of each example (the shortest
 * max_examples of the dataset, encoded as for training); the figures are
 * over all their logit rows: the relative L2 distance ||merged - trained|| /
 * ||trained||, the largest absolute difference of a logit, and the share of
 * rows whose top-1 token agrees. Memory: the two models, and two logit
 * arrays of the longest chosen example.
 *
 * Errors: the models', the adapter's (it must fit the base) and the
 * dataset's (a line that does not parse or an image that is missing, with
 * its line). Thread-safe: everything lives in the call.
 */
#ifndef GF_QLORA_GAP_H
#define GF_QLORA_GAP_H

#include <stdint.h>

#include "base.h"
#include "image.h"
#include "trainset.h"

typedef struct {
    const char *base_dir;       /* the base model directory the adapter was trained on */
    const char *adapter_dir;    /* the adapter (PEFT files) */
    const char *merged_dir;     /* the merged checkpoint (merge_adapter's output) */
    const char *jsonl, *tar;    /* the dataset (tar NULL when it has no images archive) */
    int max_examples;           /* how many of its shortest examples (>= 1) */
    int n_threads;              /* <= 0 = all cores */
    ImageLimits image_limits;
    TrainSetImages images;      /* TRAINSET_IMAGES_VALIDATED for an uploaded dataset */
} QloraGapSpec;

typedef struct {
    int n_examples;
    int64_t n_rows;             /* logit rows compared */
    double rel_l2;              /* ||merged - trained|| / ||trained|| over those rows */
    double max_abs;             /* largest |merged - trained| of one logit */
    double top1_agreement;      /* share of rows whose argmax is the same token */
} QloraGap;

GfStatus qlora_gap_measure(const QloraGapSpec *s, QloraGap *out, GfError *err);

#endif
