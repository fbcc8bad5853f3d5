-- 0008_dataset_tokens: a dataset's examples measured in tokens at upload,
-- for the model the server had loaded (its served name): the total, and the
-- longest example with its line, so that a job whose max_seq_len is shorter
-- is refused when it is created. NULL when the upload was not measured (no
-- model was loaded).
ALTER TABLE datasets ADD COLUMN tokens_model TEXT;
ALTER TABLE datasets ADD COLUMN tokens INTEGER;
ALTER TABLE datasets ADD COLUMN max_tokens INTEGER;
ALTER TABLE datasets ADD COLUMN max_tokens_line INTEGER;
