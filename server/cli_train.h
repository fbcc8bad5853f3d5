/* cli_train.h - the training commands that run without a server:
 * `lora-step`, the parity tool (one sequence from a safetensors file, N AdamW
 * steps; writes losses.json, grads_step0.safetensors with PEFT's key names,
 * and adapter_final/ in PEFT's format), and `train`, the job worker's
 * trainer on local files (OUT/adapter/ in PEFT's format, OUT/checkpoints/,
 * OUT/metrics.jsonl; --resume continues from the newest checkpoint; the
 * hyperparameter flags are the REST API's keys with '-' for '_'). Return a
 * process exit status (0 ok, 1 failure, 2 usage, 3 stopped as asked) after
 * printing errors to stderr.
 */
#ifndef GF_CLI_TRAIN_H
#define GF_CLI_TRAIN_H

int cli_lora_step(int argc, char **argv);
int cli_train(int argc, char **argv);
/* `preflight`: the memory a training run takes (weights at the chosen
 * quantization, adapter state, activations at the dataset's longest
 * sequence or max_seq_len), the modules that get adapters, and the dataset's
 * first example with its trained tokens marked. Takes train's flags. */
int cli_preflight(int argc, char **argv);

#endif
