-- 0005_status_reason: why a job is where it is, in words, beyond its status:
-- a running job waiting for disk space, a paused job's reason. NULL when
-- there is nothing to say; cleared when the job runs on or is resumed.
ALTER TABLE jobs ADD COLUMN status_reason TEXT;
