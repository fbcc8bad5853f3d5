/* trainset.h - a fine-tuning dataset made ready for the trainer: every
 * conversation of a JSONL file (and the images archive it references) is
 * encoded once with the model's chat template into token ids, training labels
 * and mm_token_type_ids; images are decoded and preprocessed again each time
 * their example is fetched, so memory holds tokens, not pixels.
 *
 * Encoding (PRODUCT.md "Datasets", TOKENIZER.md §7): the images of a user
 * turn are placed before its text; each image becomes boi + N image
 * placeholders + eoi, N its soft-token count at the processor's budget; labels
 * (chat_encode CHAT_LABELS_TRAIN) cover assistant text and its <turn|> only,
 * and every assistant turn starts with exactly the prefix the generation
 * prompt gives at inference. A conversation longer than max_seq_len tokens is
 * refused (GF_UNPROCESSABLE naming the line and both counts), never cut:
 * a cut conversation would train on a turn without its end.
 *
 * The file is read strictly again (it was validated at upload, but the
 * trainer does not trust a file on disk): a line that does not parse, names
 * an image the archive lacks or cannot be decoded fails the load with its
 * line number.
 *
 * Ownership: a TrainSet owns its token arrays, a copy of the JSONL path and
 * the open archive; a TrainExample owns its pixels (train_example_free).
 * Threading: trainset_example may run on several threads at once, each
 * into its own example (the files are read with pread); everything else,
 * one thread at a time.
 */
#ifndef GF_TRAINSET_H
#define GF_TRAINSET_H

#include <stddef.h>
#include <stdint.h>

#include "backward.h"
#include "dataset.h"
#include "pipeline.h"

typedef struct TrainSet TrainSet;

typedef struct {
    TrainSequence seq;        /* views into the set, pixels into this example */
    float *pixels;            /* [n_images, n_patches, 3 p^2] owned, or NULL */
    int32_t *positions;       /* [n_images, n_patches, 2] owned, or NULL */
    size_t pixels_cap, positions_cap; /* their capacity (elements) */
    uint64_t line;            /* 1-based line of the JSONL */
} TrainExample;

/* How an image's soft-token count is found when a set is encoded: its
 * size read from its headers (image_probe), for files that passed
 * dataset_validate (an upload: every image decoded once there), or the
 * image decoded, so that a corrupt one fails the open (files nothing has
 * checked). Either way the loader decodes each image when its example
 * runs, and fails naming the line if it no longer decodes. */
typedef enum { TRAINSET_DECODE_IMAGES = 0, TRAINSET_IMAGES_VALIDATED = 1 } TrainSetImages;

/* Encodes every example of jsonl_path (tar_path NULL when no archive) for
 * the pipeline's model, tokenizer, template and image settings. */
GfStatus trainset_open(const Pipeline *p, const char *jsonl_path, const char *tar_path, int64_t max_seq_len,
                       const ImageLimits *image_limits, TrainSetImages images, TrainSet **out, GfError *err);
void trainset_close(TrainSet *t);

/* What trainset_measure finds of a dataset's examples. */
typedef struct {
    uint64_t examples;
    int64_t tokens;            /* every example's tokens, images' soft tokens included */
    int64_t max_tokens;        /* the longest example's */
    uint64_t max_tokens_line;  /* its line (the first, when several are as long) */
} TrainSetStats;

/* Encodes every example of jsonl_path as trainset_open does but one at a
 * time, keeping only the counts: the check of an upload, whose examples a
 * job encodes again, its images as TRAINSET_IMAGES_VALIDATED: the data
 * must have passed dataset_validate. A line the encoder refuses (over max_seq_len tokens:
 * code sequence_too_long; or whatever trainset_open would fail it for) is
 * added to report, which keeps max_issues of them in detail, and the
 * reading goes on. Returns GF_OK with every example counted,
 * GF_UNPROCESSABLE when report lists lines, or the error that stopped the
 * reading (I/O, memory, the archive). The caller frees report
 * (dataset_report_free) in every case. */
GfStatus trainset_measure(const Pipeline *p, const char *jsonl_path, const char *tar_path, int64_t max_seq_len,
                          const ImageLimits *image_limits, size_t max_issues, TrainSetStats *stats,
                          DatasetReport *report, GfError *err);

size_t trainset_count(const TrainSet *t);
/* Tokens of example i, and of the longest example. */
int64_t trainset_tokens(const TrainSet *t, size_t i);
int64_t trainset_max_tokens(const TrainSet *t);
/* Trained positions of example i (labels after the shift). */
int64_t trainset_targets(const TrainSet *t, size_t i);
uint64_t trainset_line(const TrainSet *t, size_t i);
/* The encoded ids and labels of example i (valid while t lives). */
void trainset_tokens_of(const TrainSet *t, size_t i, const int32_t **ids, const int32_t **labels, int64_t *n);

/* Example i with its images decoded and preprocessed into ex, whose pixel
 * buffers are reused (grown only when too small): zero ex before its first
 * use, free it with train_example_free. */
GfStatus trainset_example(TrainSet *t, size_t i, TrainExample *ex, GfError *err);
void train_example_free(TrainExample *ex);

#endif
