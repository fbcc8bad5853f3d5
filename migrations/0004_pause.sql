-- 0004_pause: pausing fine-tuning jobs, and the tokens a job trained on. A paused job keeps status 'queued'
-- with paused = 1 (the worker does not claim it; the API shows "paused");
-- pause_requested asks a running job to checkpoint and stop after its
-- current step. Resuming clears paused and the job continues from its
-- newest checkpoint.
ALTER TABLE jobs ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN pause_requested INTEGER NOT NULL DEFAULT 0;
-- trained_tokens: the training set's tokens times the epochs, once the job succeeded.
ALTER TABLE jobs ADD COLUMN trained_tokens INTEGER;
