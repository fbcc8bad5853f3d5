/* cli_export.h - `gemmaforge merge`: an adapter merged into its base model,
 * written as a complete Hugging Face model directory (engine/export/merge.h);
 * `gemmaforge export-gguf`.
 * Returns a process exit status (0 ok, 1 failure, 2 usage); the report is
 * one JSON object on stdout, progress and errors go to stderr.
 */
#ifndef GF_CLI_EXPORT_H
#define GF_CLI_EXPORT_H

int cli_merge(int argc, char **argv);
/* `gemmaforge export-gguf`: the text model (with an adapter merged in) as a
 * llama.cpp GGUF file (engine/export/gguf_export.h). */
int cli_export_gguf(int argc, char **argv);

#endif
