-- Upgrades a database created from commit 50fa58f to 72aa378, when statement-level
-- triggers replaced the foreign key tasks.job_id -> jobs to load tasks faster. b2bf520 put
-- the contract's key back in CREATE TABLE and took the triggers out of schema.sql, which
-- an existing database never sees: it kept the triggers and had no key.
DROP TRIGGER IF EXISTS tasks_have_jobs ON herder.tasks;
DROP TRIGGER IF EXISTS jobs_deleted ON herder.jobs;
DROP FUNCTION IF EXISTS herder.check_tasks_have_jobs();
DROP FUNCTION IF EXISTS herder.delete_tasks_of_deleted_jobs();
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_constraint
                   WHERE conrelid = 'herder.tasks'::regclass AND contype = 'f'
                     AND confrelid = 'herder.jobs'::regclass) THEN
        -- Since b2bf520 herder loads tasks without per-row checks, which skipped the
        -- trigger too: a task whose job is gone is one the key's cascade would have
        -- deleted, and the key cannot be added while it is there.
        DELETE FROM herder.tasks t
        WHERE NOT EXISTS (SELECT FROM herder.jobs j WHERE j.id = t.job_id);
        ALTER TABLE herder.tasks ADD CONSTRAINT tasks_job_id_fkey
            FOREIGN KEY (job_id) REFERENCES herder.jobs ON DELETE CASCADE;
    END IF;
END;
$$;
