-- Upgrades a database whose herder.claim_tasks also returned max_attempts (commits 724a250
-- to 50fa58f; bad7a90 dropped the column from the result). CREATE OR REPLACE cannot change
-- a function's result type: the old function has to go before schema.sql creates the new.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_proc
               WHERE oid = to_regprocedure('herder.claim_tasks(int, text, float8)')
                 AND 'max_attempts' = ANY (proargnames)) THEN
        DROP FUNCTION herder.claim_tasks(int, text, float8);
    END IF;
END;
$$;
