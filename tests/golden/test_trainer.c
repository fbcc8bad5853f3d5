/* test_trainer.c - the trainer's plan and its refusals, on the dense golden
 * model with a small text dataset written by the test: every example is
 * visited once per epoch, the step count follows ceil(examples / (batch x
 * accumulation)), a non-finite loss stops training before the update (the
 * adapter and the step count unchanged), and trainer_step after the plan is
 * done is refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../unit/check.h"
#include "pipeline.h"
#include "trainer.h"

#define N_EXAMPLES 7

static void write_dataset(const char *path) {
    FILE *f = fopen(path, "w");
    for (int i = 0; i < N_EXAMPLES; i++)
        fprintf(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"count to %d\"},{\"role\":\"assistant\",\"content\":\"%s\"}]}\n",
                i, i % 2 ? "one two" : "three");
    fclose(f);
}

int main(void) {
    char path[] = "/tmp/gf-trainer-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "temporary file");
    close(fd);
    write_dataset(path);
    GfError err;
    Pipeline *p = NULL;
    TrainSet *set = NULL;
    LoraAdapter *a = NULL;
    Trainer *t = NULL;
    ModelOptions mo = {.n_threads = 2};
    ImageLimits lim = {20u << 20, 50000000};
    const char *targets[] = {"q_proj", "v_proj"};
    CHECK_STATUS(pipeline_open(GF_FIXTURES "/dense", &mo, &p, &err), GF_OK, err);
    if (!p) return check_done("test_trainer");
    CHECK_STATUS(trainset_open(p, path, NULL, 2048, &lim, TRAINSET_DECODE_IMAGES, &set, &err), GF_OK, err);
    CHECK(set && trainset_count(set) == N_EXAMPLES, "every line is an example");
    CHECK_STATUS(lora_create(p->model, targets, 2, 4, 8.0, 0, 1, &a, &err), GF_OK, err);
    TrainConfig cfg = {.epochs = 2, .batch_size = 2, .grad_accum = 2, .lr = 1e-3, .max_grad_norm = 1.0,
                       .schedule = SCHED_LINEAR, .seed = 9};
    CHECK_STATUS(trainer_new(p->model, a, set, &cfg, &t, &err), GF_OK, err);
    if (!t) return check_done("test_trainer");
    CHECK(trainer_steps_per_epoch(t) == 2 && trainer_total_steps(t) == 4, "ceil(7 / 4) = 2 steps per epoch, 4 in all");
    /* the targets of one epoch's steps add up to every example's, once */
    int64_t want = 0, got = 0;
    for (size_t i = 0; i < N_EXAMPLES; i++) want += trainset_targets(set, i);
    TrainStepInfo info;
    for (int s = 0; s < 2; s++) {
        CHECK_STATUS(trainer_step(t, NULL, NULL, &info, &err), GF_OK, err);
        got += info.targets;
        CHECK(isfinite(info.loss) && info.loss > 0 && info.lr > 0, "step %d: loss %.4f at lr %g", s + 1, info.loss, info.lr);
    }
    CHECK(got == want && info.epoch == 1.0, "an epoch trains every example once (%lld of %lld tokens)", (long long)got,
          (long long)want);
    /* a non-finite loss stops before the update (the adapter lives on the
     * model's device while it trains: changes go up, values come down) */
    trainer_adapter_download(t);
    float keep = a->pairs[0].A[0], other = a->pairs[1].B[0];
    a->pairs[0].A[0] = NAN;
    trainer_adapter_upload(t);
    GfStatus st = trainer_step(t, NULL, NULL, &info, &err);
    CHECK(st == GF_UNPROCESSABLE && strcmp(err.code, "training_diverged") == 0 && strstr(err.message, "step 3"),
          "a NaN loss is refused: %s", err.message);
    a->pairs[1].B[0] = -other;
    trainer_adapter_download(t);
    CHECK(trainer_step_index(t) == 2 && a->pairs[1].B[0] == other, "nothing was updated");
    a->pairs[0].A[0] = keep;
    trainer_adapter_upload(t);
    for (int s = 0; s < 2; s++) CHECK_STATUS(trainer_step(t, NULL, NULL, &info, &err), GF_OK, err);
    CHECK(trainer_done(t) && info.lr >= 0 && info.step == 4, "the plan is done after 4 steps");
    CHECK(trainer_step(t, NULL, NULL, &info, &err) == GF_CONFLICT, "a step past the plan is refused");
    uint64_t ahead, on_demand;
    trainer_loader_stats(t, &ahead, &on_demand);
    /* on demand: the run's first example, the refused step's, its retry's */
    CHECK(on_demand == 3 && ahead == 7 + 4 + 7 - 3, "examples decoded ahead by the loader: %llu, on demand %llu",
          (unsigned long long)ahead, (unsigned long long)on_demand);
    trainer_free(t);
    lora_free(a);
    trainset_close(set);
    pipeline_close(p);
    unlink(path);
    return check_done("test_trainer");
}
