-- 0007_job_error_param: the field a failed job's error names (OpenAI's
-- error.param, e.g. "hyperparameters.quantization"); NULL when none.
ALTER TABLE jobs ADD COLUMN error_param TEXT;
