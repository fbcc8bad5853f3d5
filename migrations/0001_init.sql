-- 0001_init: datasets, fine-tuning jobs and their events and checkpoints,
-- adapters. Never edited once released; later changes come as 0002_*.sql.

CREATE TABLE datasets (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('validating', 'ready', 'failed')),
    created_at  INTEGER NOT NULL,
    n_examples  INTEGER NOT NULL,
    n_images    INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    has_images  INTEGER NOT NULL
);

CREATE TABLE jobs (
    seq                   INTEGER PRIMARY KEY AUTOINCREMENT,
    id                    TEXT NOT NULL UNIQUE,
    dataset_id            TEXT NOT NULL,            -- kept after the dataset is deleted
    validation_dataset_id TEXT,
    model                 TEXT NOT NULL,
    suffix                TEXT NOT NULL DEFAULT '',
    hyperparameters       TEXT NOT NULL,
    status                TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    cancel_requested      INTEGER NOT NULL DEFAULT 0,
    attempt               INTEGER NOT NULL DEFAULT 0,
    lease_owner           TEXT,
    lease_until           INTEGER,
    created_at            INTEGER NOT NULL,
    started_at            INTEGER,
    finished_at           INTEGER,
    error_code            TEXT,
    error_message         TEXT,
    step                  INTEGER,
    total_steps           INTEGER,
    epoch                 REAL,
    loss                  REAL,
    eval_loss             REAL,
    tokens_per_s          REAL,
    eta_s                 REAL,
    adapter_name          TEXT
);
CREATE INDEX jobs_status ON jobs(status, seq);

CREATE TABLE job_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    level       TEXT NOT NULL,
    type        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT
);
CREATE INDEX job_events_job ON job_events(job_id, seq);

CREATE TABLE checkpoints (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    step        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    metrics     TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL
);
CREATE INDEX checkpoints_job ON checkpoints(job_id, step);

CREATE TABLE adapters (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL CHECK (source IN ('uploaded', 'trained')),
    job_id      TEXT,
    base_model  TEXT NOT NULL,
    rank        INTEGER NOT NULL,
    alpha       REAL NOT NULL,
    use_rslora  INTEGER NOT NULL,
    n_modules   INTEGER NOT NULL,
    has_vision  INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
