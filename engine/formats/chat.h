/* chat.h - the Gemma 4 chat format (TOKENIZER.md §7), rendered in C for the
 * subset the product uses: a leading system message, user and assistant
 * turns, text and image parts, the generation prompt, and the thinking
 * switch. The model's own chat_template.jinja decides the variant by three
 * literal markers (blank lines around images; an empty thought block in the
 * generation prompt; a newline after <|think|>); a template without <|turn>
 * is refused as not Gemma 4.
 *
 * Refused, with a message: two assistant messages in a row (template versions
 * disagree), system messages that are not first, images outside user turns.
 * chat_encode builds ids directly: each image becomes boi + N x image +
 * eoi with N from the image processor, mm_token_type_ids 1 on the image
 * placeholders, and (for training) labels on assistant text and its closing
 * <turn|> only (none on an untrained assistant turn). Thread-safe; outputs are malloc'd and owned by the caller.
 */
#ifndef GF_CHAT_H
#define GF_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "tokenizer.h"

typedef enum { CHAT_SYSTEM = 0, CHAT_USER, CHAT_ASSISTANT } ChatRole;

typedef struct {
    int is_image;             /* 1: an image part (its soft-token count comes separately) */
    const char *text;         /* text parts */
} ChatPart;

typedef struct {
    ChatRole role;
    const ChatPart *parts;
    size_t n_parts;
    int content_is_string;    /* content was a plain string (one text part) */
    int untrained;            /* an assistant turn left out of training (OpenAI's "weight": 0): no labels */
} ChatMessage;

typedef struct {
    int image_blank_lines;    /* launch template: "\n\n<|image|>\n\n" */
    int thought_in_gen_prompt;/* 26B/31B: generation prompt ends with an empty thought block */
    int think_newline;        /* "<|think|>\n" rather than "<|think|>" */
    char bos[32];             /* the bos_token string */
} ChatTemplate;

/* Detects the variant from the template source. GF_INVALID when it is not a
 * Gemma 4 template. */
GfStatus chat_template_detect(const char *source, ChatTemplate *tpl, GfError *err);
/* Reads DIR/chat_template.jinja, or the chat_template of DIR/tokenizer_config.json. */
GfStatus chat_template_load_dir(const char *dir, ChatTemplate *tpl, GfError *err);

/* Renders the conversation to text (images as "<|image|>"). */
GfStatus chat_render(const ChatTemplate *tpl, const ChatMessage *msgs, size_t n, int add_generation_prompt,
                     int enable_thinking, char **text, GfError *err);

typedef struct {
    int32_t *ids;
    uint8_t *mm_type;         /* 1 on image placeholders */
    int32_t *labels;          /* -100 except trained positions (NULL unless asked) */
    size_t n;
} ChatTokens;

/* Labels: none; on assistant text and its <turn|> of the template's own
 * rendering; or for training, where each assistant turn also starts with
 * exactly the prefix the generation prompt gives at inference (the empty
 * thought block of the 26B/31B templates, unlabeled). */
enum { CHAT_LABELS_NONE = 0, CHAT_LABELS_TEMPLATE = 1, CHAT_LABELS_TRAIN = 2 };

/* Renders and encodes in one pass; soft_tokens[k] is the soft-token count of
 * the k-th image. boi/image/eoi ids come from the model's config; with_labels
 * is a CHAT_LABELS_ value. */
GfStatus chat_encode(const ChatTemplate *tpl, const Tokenizer *tok, const ChatMessage *msgs, size_t n,
                     const int *soft_tokens, size_t n_images, int add_generation_prompt, int enable_thinking,
                     int32_t boi_id, int32_t image_id, int32_t eoi_id, int with_labels, ChatTokens *out, GfError *err);
void chat_tokens_free(ChatTokens *t);

#endif
