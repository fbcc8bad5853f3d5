/* tokenizer.h - the Gemma 3/4 tokenizer from a Hugging Face tokenizer.json
 * (TOKENIZER.md): BPE over Unicode characters with byte fallback, added
 * tokens cut out of the raw text first (leftmost-longest), the Replace
 * normalizer, BOS from the post-processor template, and decoding with byte
 * runs (invalid runs become one U+FFFD per byte) and streaming.
 *
 * Only the component types Gemma uses are accepted; anything else is refused
 * with an error naming it (never silently ignored). Ownership: Tokenizer owns
 * every table; a loaded Tokenizer is read-only and may be shared between
 * threads. Output buffers are caller-owned and grown with realloc.
 */
#ifndef GF_TOKENIZER_H
#define GF_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"

typedef struct Tokenizer Tokenizer;

/* Parses tokenizer.json text. add_bos: -1 = as the post-processor template
 * says, 0/1 = override (tokenizer_config.json's add_bos_token). */
GfStatus tokenizer_load_json(const char *json, size_t len, int add_bos, Tokenizer **out, GfError *err);
/* Loads DIR/tokenizer.json, honouring add_bos_token of DIR/tokenizer_config.json. */
GfStatus tokenizer_load_dir(const char *dir, Tokenizer **out, GfError *err);
void tokenizer_free(Tokenizer *t);

/* Encodes UTF-8 text (GF_INVALID when it is not valid UTF-8). parse_special:
 * special added-token strings in the text become their ids (HF default).
 * *ids is (re)allocated; *n_ids set. */
GfStatus tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_special, int parse_special,
                          int32_t **ids, size_t *n_ids, GfError *err);

/* Decodes ids to a new NUL-terminated UTF-8 string (caller frees). Unknown
 * ids are dropped, as HF does. */
char *tokenizer_decode(const Tokenizer *t, const int32_t *ids, size_t n, int skip_special, GfError *err);

/* The id of a token string (added or vocab), or -1. */
int32_t tokenizer_token_id(const Tokenizer *t, const char *token);
/* The string of an id, or NULL. */
const char *tokenizer_token(const Tokenizer *t, int32_t id);
int tokenizer_is_special(const Tokenizer *t, int32_t id);
size_t tokenizer_vocab_size(const Tokenizer *t);

/* Streaming detokenization: feed ids one at a time, get text that never
 * splits a UTF-8 character and whose concatenation always equals
 * tokenizer_decode of the same ids. A run of byte-fallback tokens is held
 * until it ends, because the reference decoder turns a whole run into one
 * U+FFFD per byte when any of it is not UTF-8. Zero-initialize; end with
 * tokenizer_stream_end (or tokenizer_stream_free to drop what is held). */
typedef struct {
    uint8_t *pending;         /* the current run of byte-fallback bytes */
    size_t n_pending, cap_pending;
} TokenStream;

/* Appends the text that id completes to out[*len..] (grown as needed). */
GfStatus tokenizer_stream_push(const Tokenizer *t, TokenStream *s, int32_t id, int skip_special, char **out, size_t *len,
                               size_t *cap, GfError *err);
/* Flushes what is held and frees it (the stream may be reused). */
GfStatus tokenizer_stream_end(const Tokenizer *t, TokenStream *s, char **out, size_t *len, size_t *cap, GfError *err);
void tokenizer_stream_free(TokenStream *s);

#endif
