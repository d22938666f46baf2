-- Upgrades a database created before the per-job counts (issue 10, commit f302fdf): its
-- jobs have tasks but no job_counts rows. herder.job_counts is created here as it was
-- then, and filled by counting what is there, once: the triggers schema.sql creates next,
-- in this same transaction under migrate's lock, count every write from then on.
DO $$
BEGIN
    IF to_regclass('herder.job_counts') IS NULL THEN
        CREATE TABLE herder.job_counts (
            job_id      bigint PRIMARY KEY REFERENCES herder.jobs ON DELETE CASCADE,
            pending     bigint NOT NULL DEFAULT 0,
            in_progress bigint NOT NULL DEFAULT 0,
            success     bigint NOT NULL DEFAULT 0,
            warning     bigint NOT NULL DEFAULT 0,
            failure     bigint NOT NULL DEFAULT 0,
            canceled    bigint NOT NULL DEFAULT 0
        );
        INSERT INTO herder.job_counts
        SELECT job_id,
               count(*) FILTER (WHERE status = 'PENDING'),
               count(*) FILTER (WHERE status = 'IN_PROGRESS'),
               count(*) FILTER (WHERE status = 'SUCCESS'),
               count(*) FILTER (WHERE status = 'WARNING'),
               count(*) FILTER (WHERE status = 'FAILURE'),
               count(*) FILTER (WHERE status = 'CANCELED')
        FROM herder.tasks GROUP BY job_id;
    END IF;
END;
$$;
