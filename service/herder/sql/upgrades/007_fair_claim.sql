-- Upgrades a database whose herder.claim_tasks took no kinds and walked jobs by priority
-- and id only (everything before fair sharing and routing by kind). The claim now takes
-- the kinds a daemon serves (a new signature: the old function would stay beside it and
-- make every call ambiguous), and walks jobs by priority, owner and id (an index of a new
-- shape: CREATE INDEX IF NOT EXISTS would keep the old one under the old name).
DROP FUNCTION IF EXISTS herder.claim_tasks(int, text, float8);
DROP INDEX IF EXISTS herder.jobs_runnable_idx;
