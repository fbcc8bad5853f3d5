-- 0006_job_metadata: OpenAI's job metadata, up to 16 string key-value pairs
-- given at creation, as the JSON object text; NULL when none was given.
ALTER TABLE jobs ADD COLUMN metadata TEXT;
