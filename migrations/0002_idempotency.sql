-- 0002_idempotency: Idempotency-Key support for POST /v1/datasets and
-- POST /v1/fine_tuning/jobs. A row is 'in_progress' while the first request
-- runs and 'done' with its response once it succeeded; failed first requests
-- leave no row, so the client may retry. Rows expire after 24 hours.
CREATE TABLE idempotency (
    key             TEXT NOT NULL,
    route           TEXT NOT NULL,
    request_sha256  TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    status          INTEGER,
    response        TEXT,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (key, route)
);
