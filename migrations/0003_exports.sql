-- 0003_exports: export jobs (an adapter merged into the base model, written
-- under DATA/exports/<id>/ as a Hugging Face directory (kind 'merge') or as
-- one GGUF file for llama.cpp (kind 'gguf')). One runs at a time on the server's export
-- worker; a row left 'running' by an interrupted process is run again from
-- the start (its partial output is removed first).
CREATE TABLE exports (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL CHECK (kind IN ('merge', 'gguf')),
    adapter          TEXT NOT NULL,
    dtype            TEXT NOT NULL CHECK (dtype IN ('auto', 'bf16', 'f16', 'f32', 'q8_0', 'q4_0')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    bytes_done       INTEGER NOT NULL DEFAULT 0,
    bytes_total      INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    result           TEXT
);
CREATE INDEX exports_status ON exports(status);
