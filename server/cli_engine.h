/* cli_engine.h - the engine's command-line tools: `forward` (the parity
 * tool: token ids from a safetensors file in, logits out) and `generate`
 * (greedy continuation of a list of ids), `preprocess`, `tokenize` and
 * `infer` (the user-facing image + prompt question). They link the engine directly and
 * run on the calling thread. Each returns a process exit status (0 ok,
 * 1 failure, 2 usage) after printing errors to stderr.
 */
#ifndef GF_CLI_ENGINE_H
#define GF_CLI_ENGINE_H

int cli_forward(int argc, char **argv);
int cli_generate(int argc, char **argv);
int cli_preprocess(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
/* `infer`: image(s) + prompt in, the answer streamed to stdout. */
int cli_infer(int argc, char **argv);

#endif
