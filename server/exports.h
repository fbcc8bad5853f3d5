/* exports.h - the export worker: one thread that runs queued export jobs
 * one at a time, writing each under DATA/exports/<id>/: an adapter merged
 * into the base model as a Hugging Face directory (kind "merge",
 * engine/export/merge.h) or as one GGUF file, model.gguf (kind "gguf",
 * engine/export/gguf_export.h).
 *
 * State machine (store_worker.h): queued -> running -> succeeded | failed |
 * cancelled. Progress (bytes written of the total) is recorded about once a
 * second, and a cancel asked through the API stops the merge at the next
 * block. The output appears whole or not at all (merge builds it hidden and
 * renames it); an export found `running` at start was interrupted and runs
 * again from the beginning, after whatever it left is removed. On
 * exports_stop a running export stops at the next block and stays
 * `running`, to run again at the next start.
 *
 * Threads: exports_start and exports_stop are called by the main thread.
 */
#ifndef GF_EXPORTS_H
#define GF_EXPORTS_H

#include "image.h"
#include "store.h"

typedef struct {
    const char *model_dir;     /* the base model's directory */
    double poll_s;             /* how often an idle worker looks for work */
    ImageLimits image_limits;  /* for the QLoRA check's examples */
} ExportsConfig;

typedef struct Exports Exports;

GfStatus exports_start(const ExportsConfig *cfg, Store *store, Exports **out, GfError *err);
void exports_stop(Exports *x);

#endif
