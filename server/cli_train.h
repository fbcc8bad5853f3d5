/* cli_train.h - the training commands that run without a server:
 * `lora-step`, the parity tool (one sequence from a safetensors file, N AdamW
 * steps; writes losses.json, grads_step0.safetensors with PEFT's key names,
 * and adapter_final/ in PEFT's format). Returns a process exit status (0 ok,
 * 1 failure, 2 usage) after printing errors to stderr.
 */
#ifndef GF_CLI_TRAIN_H
#define GF_CLI_TRAIN_H

int cli_lora_step(int argc, char **argv);

#endif
