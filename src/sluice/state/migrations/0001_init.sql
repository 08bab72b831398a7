-- 0001_init: checkpoints, operator state and source positions of sluice pipelines.
--
-- Runs inside the migration transaction with search_path set to the
-- [state_store] schema only, so nothing here names a schema. A shipped
-- migration is never edited: a change is a new numbered file.

CREATE TABLE sluice_checkpoints (
    pipeline     text        PRIMARY KEY,
    version      bigint      NOT NULL CHECK (version > 0),
    watermark_us bigint,
    writer       text        NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE sluice_checkpoints IS
    'sluice: one row per pipeline; version is raised by one per commit and fences concurrent writers';
COMMENT ON COLUMN sluice_checkpoints.watermark_us IS
    'last committed watermark, microseconds since the epoch';
COMMENT ON COLUMN sluice_checkpoints.writer IS
    'host:pid:id of the process that made the last commit';

CREATE TABLE sluice_state (
    pipeline   text        NOT NULL,
    key        text        NOT NULL CHECK (key <> ''),
    value      bytea       NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, key)
);
COMMENT ON TABLE sluice_state IS
    'sluice: operator state blobs (versioned binary formats of the stages) by pipeline and key';
COMMENT ON COLUMN sluice_state.version IS
    'checkpoint version of the commit that last wrote the row';

CREATE TABLE sluice_offsets (
    pipeline      text        NOT NULL,
    source        text        NOT NULL,
    partition     text        NOT NULL,
    position_int  bigint,
    position_text text,
    version       bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, source, partition),
    CHECK ((position_int IS NULL) <> (position_text IS NULL))
);
COMMENT ON TABLE sluice_offsets IS
    'sluice: next record to read per pipeline, source and partition (Kafka: offset + 1)';
COMMENT ON COLUMN sluice_offsets.position_int IS
    'integer positions (Kafka offsets, sequence numbers); position_text holds the others';
