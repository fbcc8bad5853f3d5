/* inference.h - one inference request between the HTTP server and the
 * serving engine: the request is checked and encoded on the HTTP thread,
 * submitted to the engine, and answered as a deferred reply (http.h) fed by
 * the engine's events: a chat.completion JSON object, or server-sent
 * chat.completion.chunk events ending in "data: [DONE]".
 *
 * Text: tokens are detokenized as they come (a UTF-8 character split over
 * tokens is held back until complete); stop strings end the request, the
 * text cut before the match; while streaming, the tail that could still be
 * the start of a stop string is held back until it cannot.
 *
 * Ownership: an InferCall is shared by the engine (until its SERVE_END) and
 * the connection (until abandon); the last to let go frees it. Threading:
 * sink on the engine thread, everything else on HTTP threads; one mutex.
 */
#ifndef GF_API_INFERENCE_H
#define GF_API_INFERENCE_H

#include "api.h"
#include "http.h"
#include "serve.h"

#define INFER_MAX_STOP 16

typedef struct {
    char model[STORE_NAME_MAX];   /* as the client named it (echoed back) */
    char adapter[STORE_NAME_MAX]; /* "" = base */
    char adapter_dir[4096];
    int stream, include_usage;
    int chat;                     /* 1: OpenAI chat shapes; 0: /v1/infer's plain JSON */
    char *stop[INFER_MAX_STOP];   /* owned copies */
    int n_stop;
} InferOptions;

/* Frees the stop strings. */
void inference_options_free(InferOptions *o);

/* Submits s (taken over) and fills resp with the deferred reply. On a
 * refusal (queue full, too long, shutting down) resp gets the error at
 * once. opts' stop strings are taken over. */
GfStatus inference_start_or_reply(Api *api, ServeSubmit *s, InferOptions *opts, HttpResp *resp);

/* The adapter directory of model name (base: adapter ""), or a 404
 * model_not_found error. */
GfStatus inference_resolve_model(Api *api, const char *name, InferOptions *opts, GfError *err);

/* Decodes and preprocesses one image (magic-number sniffing, the server's
 * byte and pixel limits) into a ServeImage, with its n_soft tokens and the
 * digest of its bytes (the engine's vision cache key). */
GfStatus inference_image(Api *api, const uint8_t *bytes, size_t n, ServeImage *out, GfError *err);

/* Chat-encodes msgs (images counted by soft tokens) into s's prompt. */
GfStatus inference_encode(Api *api, const ChatMessage *msgs, size_t n_msgs, ServeSubmit *s, GfError *err);

#endif
