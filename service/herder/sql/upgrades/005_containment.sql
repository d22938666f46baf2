-- Upgrades a database created before containment (issue 9, commit 7427e6e), whose jobs
-- had no verification flag and no batched-control columns, whose on_finished outbox was a
-- flag on the job, and whose tasks were found per job by a BRIN index (from d6e05ce on).

-- Columns CREATE TABLE herder.jobs has had since then; an existing table never sees them.
ALTER TABLE herder.jobs ADD COLUMN IF NOT EXISTS verified boolean NOT NULL DEFAULT true;
ALTER TABLE herder.jobs ADD COLUMN IF NOT EXISTS stale_tasks int NOT NULL DEFAULT 0;
ALTER TABLE herder.jobs ADD COLUMN IF NOT EXISTS reopening text;
ALTER TABLE herder.jobs ADD COLUMN IF NOT EXISTS reopen_from int NOT NULL DEFAULT 0;

-- The outbox became a table, one row per settlement: carry pending hooks over, so none
-- is lost. The table is created here as it was then, because the hooks need somewhere to
-- go before schema.sql runs.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_attribute
               WHERE attrelid = 'herder.jobs'::regclass AND attname = 'finish_pending'
                 AND NOT attisdropped) THEN
        CREATE TABLE IF NOT EXISTS herder.finish_hooks (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id      bigint NOT NULL REFERENCES herder.jobs ON DELETE CASCADE,
            status      text NOT NULL,
            message     text,
            attempts    int NOT NULL DEFAULT 0,
            runner      text,
            lease_until timestamptz,
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        INSERT INTO herder.finish_hooks (job_id, status, message)
        SELECT id, status, message FROM herder.jobs WHERE finish_pending;
        DROP INDEX IF EXISTS herder.jobs_finish_pending_idx;
        ALTER TABLE herder.jobs DROP COLUMN finish_pending, DROP COLUMN finish_lease_until;
    END IF;
END;
$$;

-- A BRIN index cannot narrow a job whose rows moved (every update writes a new version
-- wherever there is room): the B-tree tasks_job_idx in schema.sql replaces it.
DROP INDEX IF EXISTS herder.tasks_job_brin;
