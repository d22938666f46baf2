-- Upgrades a database created by the engine core (commit ce64d6c), whose tasks had a
-- unique (job_id, seq) constraint, an index of running tasks' leases, and their pending
-- set indexed by (job_id, id). d6e05ce dropped the first two and keyed the pending set by
-- (job_id, seq), but in CREATE TABLE and CREATE INDEX IF NOT EXISTS only, which an existing
-- database never sees. Such a database kept two more B-trees to maintain on every task
-- write than a new one has, and its index of the pending set did not give a job's pending
-- tasks in seq order, the order claims take them in.
ALTER TABLE herder.tasks DROP CONSTRAINT IF EXISTS tasks_job_seq_key;
DROP INDEX IF EXISTS herder.tasks_lease_idx;
-- schema.sql creates it again, on (job_id, seq).
DO $$
BEGIN
    IF pg_catalog.pg_get_indexdef(to_regclass('herder.tasks_pending_idx'))
       LIKE '%USING btree (job_id, id)%' THEN
        DROP INDEX herder.tasks_pending_idx;
    END IF;
END;
$$;
