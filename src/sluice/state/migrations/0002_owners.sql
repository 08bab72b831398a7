-- 0002_owners: who owns each source partition of a pipeline run as replicas.
--
-- A replica claims the partitions the consumer group assigned it (the
-- generation goes up by one per claim) before it loads their state; every
-- checkpoint it commits checks, under a row lock, that it still holds each
-- claim. A replica whose partition was claimed by another since is fenced:
-- two replicas never both write one partition's state or position.

CREATE TABLE sluice_owners (
    pipeline    text        NOT NULL,
    partition   text        NOT NULL,
    owner       text        NOT NULL,
    generation  bigint      NOT NULL CHECK (generation > 0),
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, partition)
);
COMMENT ON TABLE sluice_owners IS
    'sluice: the replica (host:pid:id) that owns each source partition key (topic:partition) of a pipeline';
