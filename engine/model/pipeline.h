/* pipeline.h - from a conversation with images to generated text: the model,
 * its tokenizer, its chat template and its image processor settings, loaded
 * together from one model directory, and the steps between them (image
 * preprocessing, the vision tower, chat encoding with each image expanded to
 * its soft-token count, generation with streaming detokenization).
 *
 * The processor settings come from processor_config.json ("image_processor")
 * or preprocessor_config.json; values the engine does not implement
 * (normalisation, another resampling filter, a patch size or pooling kernel
 * that disagrees with config.json) are refused at open, naming the field.
 * Without either file the published defaults apply (GEMMA4.md §1.6).
 *
 * Ownership: a Pipeline owns its Model, Tokenizer and settings; a Prompt owns
 * its arrays (prompt_free). Threading: like Model, one thread at a time.
 * Errors: GfError with the codes of the steps (invalid_image, image_too_large,
 * unsupported_image_format, too_many_images, no_vision_tower, ...).
 */
#ifndef GF_PIPELINE_H
#define GF_PIPELINE_H

#include <stddef.h>
#include <stdint.h>

#include "chat.h"
#include "image.h"
#include "model.h"
#include "preprocess.h"
#include "tokenizer.h"

typedef struct Pipeline {
    Model *model;
    Tokenizer *tok;
    ChatTemplate tpl;
    PreprocessConfig pre;     /* max_soft_tokens is the default budget */
} Pipeline;

GfStatus pipeline_open(const char *dir, const ModelOptions *opts, Pipeline **out, GfError *err);
void pipeline_close(Pipeline *p);

/* Reads the image processor settings of a model directory (exposed for tests). */
GfStatus pipeline_load_processor(const char *dir, const VisionConfig *vision, PreprocessConfig *pre, GfError *err);

typedef struct {
    int32_t *ids;             /* [n] */
    uint8_t *mm_type;         /* [n] 1 on image placeholders */
    float *soft;              /* [n_soft, hidden] soft tokens of all images in order (device memory, in soft_buf), or NULL */
    KnBuffer soft_buf;
    const Model *model;       /* whose backend holds soft_buf */
    int64_t n, n_soft;
    const LoraBinding *lora;  /* the adapter of this request (not owned), or NULL */
} Prompt;

/* Encodes a conversation for generation (the generation prompt appended).
 * images[k] is the k-th image part in message order; budget is the soft-token
 * budget per image (0 = the processor's). Runs the vision tower, with the
 * adapter lora (may be NULL), which generation then uses too. */
GfStatus pipeline_prompt(Pipeline *p, const LoraBinding *lora, const ChatMessage *msgs, size_t n_msgs, const Image *images,
                         size_t n_images, int budget, int enable_thinking, Prompt *out, GfError *err);
void prompt_free(Prompt *pr);

/* Receives decoded text as it is generated; returns nonzero to stop early. */
typedef int (*TextSink)(void *user, const char *text, size_t len);

typedef enum { FINISH_STOP = 0, FINISH_LENGTH, FINISH_CANCELLED } FinishReason;

typedef struct {
    int32_t *ids;             /* optional: the caller's buffer for the generated ids (max_new) */
    int64_t n_prompt, n_generated;
    FinishReason finish;
    double prefill_s, decode_s;  /* wall time of the prompt and of the rest */
} GenResult;

/* Greedy generation of up to max_new tokens after the prompt; stops at an
 * end-of-sequence id of the model (not emitted). Text goes to sink (may be
 * NULL), special tokens are not emitted. When res->ids is set on entry the
 * generated ids are written there. */
GfStatus pipeline_generate(Pipeline *p, const Prompt *pr, int64_t max_new, TextSink sink, void *user, GenResult *res,
                           GfError *err);

#endif
