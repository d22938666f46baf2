-- Every query herder runs, by name. Loaded by herder.sql; parameters are always bound,
-- never formatted in. They are named (:job_id): herder.sql numbers them for PostgreSQL
-- ($1, $2 ... in the order they first appear), and callers pass arguments by name.

-- ---------------------------------------------------------------- preparation

-- name: claim_preparations
-- Up to :limit PREPARING jobs nobody holds (or whose preparer's lease ran out: it died).
-- Each claim bumps the generation, which names this preparation attempt: every write it
-- makes is fenced by it, so an earlier holder (dead, slow, or this very daemon before a
-- cancel and resume) can write nothing more.
-- Only jobs of the kinds this daemon serves (:kinds; NULL: any). A job marked as served
-- by no daemon loses the mark (see mark_unserved_jobs): a PREPARING job has no other
-- message.
UPDATE herder.jobs j
SET preparer = :preparer,
    prepare_lease_until = clock_timestamp() + make_interval(secs => :lease_seconds),
    generation = j.generation + 1,
    message = NULL
WHERE j.id IN (
    SELECT id FROM herder.jobs
    WHERE status = 'PREPARING'
      AND (prepare_lease_until IS NULL OR prepare_lease_until < clock_timestamp())
      AND (:kinds::text[] IS NULL OR kind = ANY (:kinds::text[]))
    ORDER BY priority DESC, id
    LIMIT :limit
    FOR NO KEY UPDATE SKIP LOCKED
)
RETURNING j.id, j.kind, j.payload, j.priority, j.owner, j.generation, j.prepared,
          j.stale_tasks, herder.setting('max_tasks_per_job') AS max_tasks;

-- name: copy_modes
-- COPY FROM refuses a role subject to row-level security (a daemon running as a plain
-- herder_worker member); such a daemon writes every batch with write_batch.
-- A role that may set session_replication_role (a superuser, or one granted SET on it)
-- may load with the foreign key's per-row checks off: see herder/preparation.py.
SELECT r.rolsuper OR r.rolbypassrls OR pg_has_role(c.relowner, 'USAGE') AS copy,
       has_parameter_privilege('session_replication_role', 'SET') AS unchecked
FROM pg_roles r, pg_class c
WHERE r.rolname = current_user AND c.oid = 'herder.tasks'::regclass;

-- name: skip_row_triggers
-- For one transaction writing tasks only for jobs it holds (SET LOCAL: a COPY switches
-- back before its batch's fenced write): in replica mode PostgreSQL fires no ordinary
-- trigger, the foreign key's per-row check included. The counting triggers are ENABLE
-- ALWAYS and still fire.
SET LOCAL session_replication_role = replica;

-- name: fire_row_triggers
SET LOCAL session_replication_role = origin;

-- name: write_batch
-- One statement: the batch (:seqs, :payloads) is written only while this daemon still
-- holds this generation's preparation of a PREPARING job (cancel_job waits for the row
-- lock), and only right after the batch before it (:prepared_before: `prepared` when this
-- batch began), and the job's `prepared` count (:prepared_after) commits with it, so a
-- resumed preparation knows exactly where to continue. Returns no row when the job is no
-- longer ours. (A batch sent by COPY beforehand, in the same transaction, passes empty
-- arrays.)
-- NO KEY UPDATE, not UPDATE: the next batch, loading meanwhile, holds KEY SHARE on the
-- job through its foreign key checks, and waits for this one to commit before its own
-- turn. FOR UPDATE would wait for it in turn: a deadlock no server could see.
WITH held AS (
    SELECT id FROM herder.jobs
    WHERE id = :job_id AND generation = :generation AND preparer = :preparer
      AND status = 'PREPARING' AND prepared = :prepared_before AND stale_tasks = 0
    FOR NO KEY UPDATE
), written AS (
    INSERT INTO herder.tasks (job_id, seq, payload)
    SELECT held.id, b.seq, b.payload
    FROM held, unnest(:seqs::int[], :payloads::jsonb[]) AS b(seq, payload)
)
UPDATE herder.jobs j
SET prepared = :prepared_after,
    prepare_lease_until = clock_timestamp() + make_interval(secs => :lease_seconds)
FROM held WHERE j.id = held.id
RETURNING j.id;

-- name: write_last_batch
-- The same, for the last batch: the commit that makes the job's tasks claimable (PENDING)
-- and wakes the workers. The preparation's lease ends here, so where write_batch takes
-- :lease_seconds this takes the job's :max_attempts.
WITH held AS (
    SELECT id FROM herder.jobs
    WHERE id = :job_id AND generation = :generation AND preparer = :preparer
      AND status = 'PREPARING' AND prepared = :prepared_before AND stale_tasks = 0
    FOR NO KEY UPDATE
), written AS (
    INSERT INTO herder.tasks (job_id, seq, payload)
    SELECT held.id, b.seq, b.payload
    FROM held, unnest(:seqs::int[], :payloads::jsonb[]) AS b(seq, payload)
), done AS (
    UPDATE herder.jobs j
    SET status = 'PENDING', prepared = :prepared_after, prepared_at = clock_timestamp(),
        preparer = NULL, prepare_lease_until = NULL, max_attempts = :max_attempts
    FROM held WHERE j.id = held.id
    RETURNING j.id
)
SELECT id, pg_notify('herder_tasks', '') FROM done;

-- name: write_small_preparations
-- Whole preparations of several jobs (:job_ids, :generations, :max_attempts,
-- :task_counts), each fitting one batch, in one statement: their tasks (:task_job_ids,
-- :seqs, :payloads) are written, and each job made PENDING, only for the jobs this
-- preparation still holds, exactly as write_last_batch does for one job. Jobs locked in
-- id order, like every multi-job lock here.
WITH held AS (
    SELECT j.id, h.max_attempts, h.tasks FROM herder.jobs j
    JOIN unnest(:job_ids::bigint[], :generations::int[], :max_attempts::int[],
                :task_counts::int[]) AS h(id, generation, max_attempts, tasks)
      ON j.id = h.id AND j.generation = h.generation
    WHERE j.preparer = :preparer AND j.status = 'PREPARING' AND j.prepared = 0
      AND j.stale_tasks = 0
    ORDER BY j.id
    FOR NO KEY UPDATE OF j
), written AS (
    INSERT INTO herder.tasks (job_id, seq, payload)
    SELECT b.job_id, b.seq, b.payload
    FROM unnest(:task_job_ids::bigint[], :seqs::int[], :payloads::jsonb[])
         AS b(job_id, seq, payload)
    WHERE b.job_id IN (SELECT id FROM held)
), done AS (
    UPDATE herder.jobs j
    SET status = 'PENDING', prepared = held.tasks, prepared_at = clock_timestamp(),
        preparer = NULL, prepare_lease_until = NULL, max_attempts = held.max_attempts
    FROM held WHERE j.id = held.id
    RETURNING j.id
)
SELECT id, pg_notify('herder_tasks', '') FROM done;

-- name: fail_preparation
-- Fenced like a batch: only the preparation holding this generation may fail the job.
-- The tasks it wrote become stale, deleted afterwards in batches (discard_stale_batch):
-- one statement deleting millions of rows would hold up everyone.
WITH failed AS (
    UPDATE herder.jobs
    SET status = 'FAILURE', message = :message, ended_at = clock_timestamp(),
        preparer = NULL, prepare_lease_until = NULL,
        stale_tasks = GREATEST(stale_tasks, prepared), prepared = 0
    WHERE id = :job_id AND generation = :generation AND preparer = :preparer
      AND status = 'PREPARING'
    RETURNING id, status, message
), hooked AS (
    INSERT INTO herder.finish_hooks (job_id, status, message)
    SELECT id, status, message FROM failed WHERE :run_hook
)
SELECT id, pg_notify('herder_job_finished', id::text) FROM failed;

-- name: stale_tasks
SELECT stale_tasks FROM herder.jobs WHERE id = :job_id;

-- name: discard_stale_batch
-- The top window of an earlier run's tasks (seq in [:stale_tasks - :window,
-- :stale_tasks)), by the job's B-tree. Fenced by the count itself: whoever moves it first
-- deletes the window, so a preparer and a sweep may both work on one job.
WITH job AS (
    UPDATE herder.jobs SET stale_tasks = GREATEST(stale_tasks - :window, 0)
    WHERE id = :job_id AND stale_tasks = :stale_tasks
    RETURNING id, stale_tasks AS below
), gone AS (
    DELETE FROM herder.tasks t USING job
    WHERE t.job_id = job.id AND t.seq >= job.below AND t.seq < :stale_tasks
)
SELECT below FROM job;

-- name: stale_jobs
-- Jobs with an earlier run's tasks left to delete (restarted, or whose preparation
-- failed), for the sweep: a preparer that died mid-way leaves some.
SELECT id FROM herder.jobs WHERE stale_tasks > 0 ORDER BY id LIMIT :limit;

-- name: release_preparation
UPDATE herder.jobs SET preparer = NULL, prepare_lease_until = NULL
WHERE id = :job_id AND generation = :generation AND preparer = :preparer
  AND status = 'PREPARING';

-- name: renew_preparations
-- Returns the (job, generation) renewed: any other is no longer this daemon's.
UPDATE herder.jobs j
SET prepare_lease_until = clock_timestamp() + make_interval(secs => :lease_seconds)
FROM unnest(:job_ids::bigint[], :generations::int[]) AS h(id, generation)
WHERE j.id = h.id AND j.generation = h.generation AND j.preparer = :preparer
  AND j.status = 'PREPARING'
RETURNING j.id, j.generation;

-- name: preparations_lost
-- Of the given (job, generation), those this daemon must stop preparing: canceled,
-- restarted, deleted or taken over.
SELECT h.id, h.generation
FROM unnest(:job_ids::bigint[], :generations::int[]) AS h(id, generation)
WHERE NOT EXISTS (
    SELECT 1 FROM herder.jobs j
    WHERE j.id = h.id AND j.generation = h.generation AND j.preparer = :preparer
      AND j.status = 'PREPARING'
);

-- ---------------------------------------------------------------- tasks

-- name: claim_tasks
-- See herder.claim_tasks in schema.sql: one round trip, planner settings attached.
SELECT id, job_id, seq, payload, attempts, attempts_base, kind, job_status, priority
FROM herder.claim_tasks(:batch, :worker, :lease_seconds, :kinds::text[], :fair);

-- name: start_jobs
-- PENDING -> IN_PROGRESS once a task of the job has started. Locks in id order so two
-- daemons starting the same jobs cannot deadlock. (The ids are matched twice: on the
-- outer scan too, so that the planner, whatever its statistics say, reads those rows by
-- index instead of hashing a scan of every job.)
UPDATE herder.jobs j SET status = 'IN_PROGRESS', started_at = clock_timestamp()
WHERE j.id = ANY(:job_ids::bigint[]) AND j.id IN (
    SELECT id FROM herder.jobs
    WHERE id = ANY(:job_ids::bigint[]) AND status = 'PENDING'
    ORDER BY id
    FOR NO KEY UPDATE
) AND j.status = 'PENDING'
RETURNING extract(epoch FROM j.started_at - j.created_at)::float8 AS latency;

-- name: complete_tasks
-- One statement for a whole batch of outcomes. Fenced: an outcome applies only to the
-- attempt it belongs to, and only while that attempt is still IN_PROGRESS, so a late or
-- stale worker (cancel, lease lost, job restarted) changes nothing.
UPDATE herder.tasks t
SET status = r.status,
    message = r.message,
    result = r.result::jsonb,
    traceback = r.traceback,
    ended_at = CASE WHEN r.status = 'PENDING' THEN NULL ELSE clock_timestamp() END,
    run_at = CASE WHEN r.status = 'PENDING'
                  THEN clock_timestamp() + make_interval(secs => r.delay) END,
    worker = NULL,
    lease_until = NULL
FROM unnest(:task_ids::bigint[], :attempts::int[], :statuses::text[], :messages::text[],
            :results::text[], :tracebacks::text[], :delays::float8[])
     AS r(id, attempt, status, message, result, traceback, delay)
WHERE t.id = r.id AND t.attempts = r.attempt AND t.status = 'IN_PROGRESS'
RETURNING t.id, t.job_id;

-- name: complete_successes
-- complete_tasks for the commonest outcome, SUCCESS with no message, result or
-- traceback: the same write, from two arrays instead of seven (encoding the arrays is a
-- good part of what a short task costs the daemon).
UPDATE herder.tasks t
SET status = 'SUCCESS', message = NULL, result = NULL, traceback = NULL,
    ended_at = clock_timestamp(), run_at = NULL, worker = NULL, lease_until = NULL
FROM unnest(:task_ids::bigint[], :attempts::int[]) AS r(id, attempt)
WHERE t.id = r.id AND t.attempts = r.attempt AND t.status = 'IN_PROGRESS'
RETURNING t.id, t.job_id;

-- name: release_tasks
-- Shutdown: tasks claimed but not finished go back without spending an attempt.
UPDATE herder.tasks t
SET status = 'PENDING', attempts = t.attempts - 1, started_at = NULL, worker = NULL,
    lease_until = NULL
FROM unnest(:task_ids::bigint[], :attempts::int[]) AS r(id, attempt)
WHERE t.id = r.id AND t.attempts = r.attempt AND t.status = 'IN_PROGRESS'
  AND t.worker = :worker
RETURNING t.id;

-- name: renew_task_leases
-- One statement per heartbeat for every (task, attempt) this daemon holds. Rows locked
-- right now (being completed, or by anyone else) are skipped, not waited for; the ids
-- renewed come back, and the rest are tried again soon.
UPDATE herder.tasks t
SET lease_until = clock_timestamp() + make_interval(secs => :lease_seconds)
WHERE t.id IN (
    SELECT p.id FROM herder.tasks p
    JOIN unnest(:task_ids::bigint[], :attempts::int[]) AS h(id, attempt)
      ON p.id = h.id AND p.attempts = h.attempt
    WHERE p.status = 'IN_PROGRESS' AND p.worker = :worker
    FOR UPDATE OF p SKIP LOCKED
)
RETURNING t.id, t.attempts;

-- name: my_running_tasks
-- Tasks the database says this daemon runs: after a claim whose reply was lost, those it
-- does not hold are handed back (release_tasks) instead of waiting out their lease.
SELECT id, attempts FROM herder.tasks WHERE status = 'IN_PROGRESS' AND worker = :worker;

-- name: rescue_expired_tasks
-- Tasks whose worker died: back to PENDING, FAILURE once the attempts are spent,
-- CANCELED if their job is being canceled. Not the rescuer's own (:rescuer) whose lease
-- ran out: a daemon that could not renew a lease for a while still runs the task, and
-- renews it when it can. But its own started before it did (:rescuer_started, its start
-- on the database's clock) are a previous process's of the same name, restarted: lost
-- too.
WITH expired AS (
    SELECT id FROM herder.tasks
    WHERE status = 'IN_PROGRESS'
      AND (lease_until < clock_timestamp() AND worker IS DISTINCT FROM :rescuer
           OR worker = :rescuer AND started_at < :rescuer_started)
    ORDER BY lease_until
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE herder.tasks t
    SET status = CASE
        WHEN j.status NOT IN ('PENDING', 'IN_PROGRESS') THEN 'CANCELED'
        WHEN t.attempts - t.attempts_base >= j.max_attempts THEN 'FAILURE'
        ELSE 'PENDING' END,
    message = 'worker lost on attempt ' || t.attempts || ' (' || coalesce(t.worker, '?')
        || CASE WHEN t.worker = :rescuer THEN ', restarted)' ELSE ', lease expired)' END,
    ended_at = CASE
        WHEN j.status IN ('PENDING', 'IN_PROGRESS')
             AND t.attempts - t.attempts_base < j.max_attempts THEN NULL
        ELSE clock_timestamp() END,
    worker = NULL,
    lease_until = NULL
FROM expired e, herder.jobs j
WHERE t.id = e.id AND j.id = t.job_id
RETURNING t.id, t.job_id, t.status
)
-- Tasks back to PENDING wake every daemon's claimer, not just this one's.
SELECT r.id, r.job_id, r.status,
       CASE WHEN r.status = 'PENDING' THEN pg_notify('herder_tasks', '') END AS woke
FROM rescued r;

-- name: jobs_not_running
-- Of the given jobs, those whose tasks must stop: canceled, restarted or deleted.
SELECT x.id FROM unnest(:job_ids::bigint[]) AS x(id)
WHERE NOT EXISTS (
    SELECT 1 FROM herder.jobs j WHERE j.id = x.id AND j.status IN ('PENDING', 'IN_PROGRESS')
);

-- ---------------------------------------------------------------- settlement

-- name: settle_candidates
-- Jobs that may be able to settle: nothing runs, nothing is pending (a CANCELING job's
-- pending tasks are canceled first, in batches) and nothing is being reopened. :job_ids
-- NULL means all jobs.
SELECT j.id, j.status FROM herder.jobs j
WHERE j.status IN ('PENDING', 'IN_PROGRESS', 'CANCELING')
  AND j.reopening IS NULL
  AND (:job_ids::bigint[] IS NULL OR j.id = ANY(:job_ids::bigint[]))
  AND NOT EXISTS (SELECT 1 FROM herder.tasks t
                  WHERE t.job_id = j.id AND t.status = 'IN_PROGRESS')
  AND (j.status = 'CANCELING' OR NOT EXISTS (
          SELECT 1 FROM herder.tasks t WHERE t.job_id = j.id AND t.status = 'PENDING'))
ORDER BY j.id;

-- name: prefer_indexes
-- For one transaction that reads and writes a batch of jobs by id. Statistics taken while
-- the jobs table was small (a fresh service, or a history of a few big jobs) make a scan
-- of every job look cheaper than a few hundred index lookups, and thousands of jobs
-- submitted before the next analyze then pay that scan in every statement.
SET LOCAL enable_seqscan = off;

-- name: lock_for_settlement
-- The only lock on a job row taken because of task outcomes, and only when it can be the
-- last: settlement happens once, under it. In id order, so two daemons settling
-- overlapping sets of jobs cannot deadlock. (The counts are read by the next statement,
-- whose snapshot sees everything committed before these locks were granted.)
-- Every lock herder takes on a job row to change it is NO KEY UPDATE: it excludes every
-- other change, but not the KEY SHARE that inserting tasks and folding counts take to
-- keep the job from being deleted under them (FOR UPDATE waited for those: a settlement
-- of many small jobs queued behind each fold).
SELECT id, status, kind FROM herder.jobs
WHERE id = ANY(:job_ids::bigint[]) AND status IN ('PENDING', 'IN_PROGRESS', 'CANCELING')
  AND reopening IS NULL
ORDER BY id
FOR NO KEY UPDATE;

-- name: cancel_pending_batch
-- A CANCELING job's pending tasks, a batch per statement (cancel_job itself touches no
-- task). Rows a claim is taking right now are skipped: that claim's worker cancels them.
UPDATE herder.tasks t SET status = 'CANCELED', ended_at = clock_timestamp(),
                          message = 'canceled before it started'
WHERE t.id IN (
    SELECT p.id FROM herder.tasks p
    WHERE p.job_id = :job_id AND p.status = 'PENDING'
    ORDER BY p.seq
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
) AND t.status = 'PENDING'
  AND EXISTS (SELECT 1 FROM herder.jobs j WHERE j.id = :job_id AND j.status = 'CANCELING');

-- name: reopening_jobs
SELECT id, reopening, reopen_from FROM herder.jobs
WHERE reopening IS NOT NULL ORDER BY id LIMIT :limit;

-- name: reopen_batch
-- One window of a resumed (:reopening 'resume': CANCELED tasks) or retried ('retry':
-- FAILURE tasks, with a fresh attempt budget) job's tasks back to PENDING, seq in
-- [:reopen_from, :reopen_from + :window). Fenced by the window's start, so daemons
-- working on one job take turns; the last window clears the mark and the job may settle
-- again.
WITH job AS (
    UPDATE herder.jobs
    SET reopen_from = :reopen_from + :window,
        reopening = CASE WHEN :reopen_from + :window >= prepared THEN NULL
                         ELSE reopening END
    WHERE id = :job_id AND reopening = :reopening AND reopen_from = :reopen_from
      AND status IN ('PREPARING', 'PENDING', 'IN_PROGRESS')
    RETURNING id, reopening
), reopened AS (
    UPDATE herder.tasks t
    SET status = 'PENDING', message = NULL, ended_at = NULL, started_at = NULL,
        run_at = NULL,
        attempts_base = CASE WHEN :reopening = 'retry' THEN t.attempts
                             ELSE t.attempts_base END,
        result = CASE WHEN :reopening = 'retry' THEN NULL ELSE t.result END,
        traceback = CASE WHEN :reopening = 'retry' THEN NULL ELSE t.traceback END
    FROM job
    WHERE t.job_id = job.id AND t.seq >= :reopen_from AND t.seq < :reopen_from + :window
      AND t.status = CASE WHEN :reopening = 'retry' THEN 'FAILURE' ELSE 'CANCELED' END
    RETURNING t.id
)
SELECT (SELECT reopening IS NULL FROM job) AS done,
       (SELECT count(*) FROM reopened) AS reopened,
       CASE WHEN EXISTS (SELECT 1 FROM reopened) THEN pg_notify('herder_tasks', '') END
         AS woke
FROM job;

-- name: task_counts
-- The jobs' counts: their job_counts rows plus their unfolded deltas (see job_counts in
-- schema.sql), by index, never a scan of their tasks. The daemon reads the tables itself,
-- for a whole batch of jobs in one plan, rather than calling herder.task_counts once per
-- job. A job with no row has no tasks.
SELECT x.job_id AS id, sum(x.pending)::bigint AS pending,
       sum(x.in_progress)::bigint AS in_progress, sum(x.success)::bigint AS success,
       sum(x.warning)::bigint AS warning, sum(x.failure)::bigint AS failure,
       sum(x.canceled)::bigint AS canceled
FROM (
    SELECT c.job_id, c.pending, c.in_progress, c.success, c.warning, c.failure, c.canceled
    FROM herder.job_counts c WHERE c.job_id = ANY(:job_ids::bigint[])
    UNION ALL
    SELECT d.job_id, d.pending, d.in_progress, d.success, d.warning, d.failure, d.canceled
    FROM herder.job_count_deltas d WHERE d.job_id = ANY(:job_ids::bigint[])
) x
GROUP BY x.job_id;

-- name: fold_counts_lock
-- One folder at a time: two folding the same jobs' rows could deadlock.
SELECT pg_try_advisory_xact_lock(7522537978313121793);

-- name: fold_counts
-- Up to :batch deltas added into job_counts and deleted, in one transaction. Deltas of jobs
-- deleted meanwhile are dropped; the jobs kept are locked against deletion until commit.
WITH folding AS (
    DELETE FROM herder.job_count_deltas d
    WHERE d.ctid = ANY (ARRAY(SELECT ctid FROM herder.job_count_deltas LIMIT :batch))
    RETURNING d.*
), summed AS (
    SELECT f.job_id, sum(f.pending) AS pending, sum(f.in_progress) AS in_progress,
           sum(f.success) AS success, sum(f.warning) AS warning, sum(f.failure) AS failure,
           sum(f.canceled) AS canceled, count(*) AS deltas
    FROM folding f GROUP BY f.job_id
), alive AS (
    SELECT s.* FROM summed s JOIN herder.jobs j ON j.id = s.job_id
    ORDER BY s.job_id
    FOR KEY SHARE OF j
), folded AS (
    INSERT INTO herder.job_counts AS c
        (job_id, pending, in_progress, success, warning, failure, canceled)
    SELECT job_id, pending, in_progress, success, warning, failure, canceled FROM alive
    ON CONFLICT (job_id) DO UPDATE
    SET pending = c.pending + excluded.pending,
        in_progress = c.in_progress + excluded.in_progress,
        success = c.success + excluded.success, warning = c.warning + excluded.warning,
        failure = c.failure + excluded.failure, canceled = c.canceled + excluded.canceled
)
SELECT coalesce(sum(deltas), 0)::bigint FROM summed;

-- name: apply_settlements
-- Many settlements in one statement. Where :hooked says so, a settlement also queues its
-- on_finished run: the outbox row commits with it, so no crash can lose it. Every
-- settlement to SUCCESS, WARNING or FAILURE is announced (:announced), hook or not.
WITH settled AS (
    UPDATE herder.jobs j
    SET status = s.status, message = s.message, ended_at = clock_timestamp(),
        started_at = coalesce(j.started_at, clock_timestamp())
    FROM unnest(:job_ids::bigint[], :statuses::text[], :messages::text[], :hooked::bool[],
                :announced::bool[]) AS s(id, status, message, hooked, announced)
    WHERE j.id = s.id
    RETURNING j.id, j.status, j.message, s.hooked, s.announced
), hooked AS (
    INSERT INTO herder.finish_hooks (job_id, status, message)
    SELECT id, status, message FROM settled WHERE hooked
)
SELECT pg_notify('herder_job_finished', id::text) FROM settled WHERE announced;

-- name: claim_finish_hook
-- The on_finished outbox: a settlement whose hook has not run, for a kind this daemon
-- knows. The lease (renewed while the hook runs) lets another daemon run it if this one
-- dies first; attempts names this run and fences its done-write.
UPDATE herder.finish_hooks h
SET attempts = h.attempts + 1, runner = :runner,
    lease_until = clock_timestamp() + make_interval(secs => :lease_seconds)
FROM herder.jobs j
WHERE h.id = (
    SELECT o.id FROM herder.finish_hooks o JOIN herder.jobs k ON k.id = o.job_id
    WHERE k.kind = ANY(:kinds::text[])
      AND (o.lease_until IS NULL OR o.lease_until < clock_timestamp())
    ORDER BY o.id
    LIMIT 1
    FOR UPDATE OF o SKIP LOCKED
) AND j.id = h.job_id
RETURNING h.id AS hook_id, h.attempts, j.id, j.kind, j.payload, h.status, h.message, j.owner;

-- name: renew_finish_hook
UPDATE herder.finish_hooks
SET lease_until = clock_timestamp() + make_interval(secs => :lease_seconds)
WHERE id = :hook_id AND attempts = :attempts AND runner = :runner
RETURNING id;

-- name: finish_hook_done
DELETE FROM herder.finish_hooks WHERE id = :hook_id AND attempts = :attempts;

-- ---------------------------------------------------------------- control and reading

-- name: submit
INSERT INTO herder.jobs (kind, payload, priority, status)
VALUES (:kind, :payload, :priority, :status)
RETURNING id;

-- name: cancel_job
SELECT herder.cancel_job(:job_id);

-- name: resume_job
SELECT herder.resume_job(:job_id);

-- name: retry_job
SELECT herder.retry_job(:job_id);

-- name: restart_job
SELECT herder.restart_job(:job_id);

-- name: verify_job
SELECT herder.verify_job(:job_id);

-- name: get_job
SELECT j.id, j.kind, j.payload, j.status, j.priority, j.owner, j.message, j.created_at,
       j.started_at, j.ended_at, p.total, p.pending, p.in_progress, p.success, p.warning,
       p.failure, p.canceled
FROM herder.jobs j JOIN herder.job_progress p ON p.job_id = j.id
WHERE j.id = :job_id;

-- name: list_jobs
SELECT j.id, j.kind, j.status, j.priority, j.owner, j.message, j.created_at,
       j.started_at, j.ended_at
FROM herder.jobs j
WHERE (:status::text IS NULL OR j.status = :status)
  AND (:kind::text IS NULL OR j.kind = :kind)
  AND (:owner::text IS NULL OR j.owner = :owner)
  AND (:since::timestamptz IS NULL OR j.created_at >= :since)
ORDER BY j.id DESC
LIMIT :limit;

-- name: max_result_bytes
SELECT herder.setting('max_result_bytes');

-- name: job_problems
SELECT id, seq, status, attempts, message FROM herder.tasks
WHERE job_id = :job_id AND status IN ('FAILURE', 'WARNING')
ORDER BY ended_at DESC NULLS LAST, id DESC
LIMIT :limit;

-- name: register_daemon
-- This daemon's row in herder.daemons, written as it starts (a row left by a previous
-- process of the same name is replaced) and renewed by its sweep.
INSERT INTO herder.daemons AS d (name, host, pid, kinds, started_at, seen_at, lease_until)
VALUES (:name, :host, :pid, :kinds::text[], clock_timestamp(), clock_timestamp(),
        clock_timestamp() + make_interval(secs => :lease_seconds))
ON CONFLICT (name) DO UPDATE
SET host = excluded.host, pid = excluded.pid, kinds = excluded.kinds,
    started_at = CASE WHEN :starting THEN excluded.started_at ELSE d.started_at END,
    seen_at = excluded.seen_at, lease_until = excluded.lease_until;

-- name: register_kinds
-- The kinds this daemon serves, with their declared limits, where the fleet does not
-- know them yet: a row that exists is the operator's to change, and is kept.
INSERT INTO herder.kinds (name, max_running)
SELECT k.name, k.max_running FROM unnest(:names::text[], :limits::int[]) AS k(name, max_running)
ON CONFLICT (name) DO NOTHING;

-- name: forget_daemon
DELETE FROM herder.daemons WHERE name = :name;

-- name: expire_daemons
-- Daemons whose lease ran out: they died without forgetting themselves.
DELETE FROM herder.daemons WHERE lease_until < clock_timestamp();

-- name: mark_unserved_jobs
-- PREPARING jobs of a kind no live daemon serves wait, and say so (claim_preparations
-- clears the message); returns how many wait.
WITH unserved AS (
    SELECT j.id, j.kind FROM herder.jobs j
    WHERE j.status = 'PREPARING'
      AND NOT EXISTS (SELECT 1 FROM herder.daemons d
                      WHERE d.lease_until >= clock_timestamp() AND j.kind = ANY (d.kinds))
), marked AS (
    UPDATE herder.jobs j
    SET message = 'waiting: no live daemon serves kind ' || quote_literal(u.kind)
    FROM unserved u
    WHERE j.id = u.id AND j.status = 'PREPARING' AND j.message IS NULL
)
SELECT count(*) FROM unserved;

-- name: daemons
SELECT name, host, pid, kinds, started_at, seen_at FROM herder.daemons ORDER BY name;

-- name: database_clock
SELECT clock_timestamp();

-- name: ping
SELECT 1;

-- name: queue_depth
-- Read at every scrape, so it must stay cheap: the task counts are index-only scans of
-- the partial indexes tasks_pending_idx and tasks_running_idx (their size is the queue,
-- not the history), and only unfinished jobs are counted (jobs_status_idx).
SELECT 'tasks' AS relation, 'PENDING' AS status, count(*) AS n
FROM herder.tasks WHERE status = 'PENDING'
UNION ALL
SELECT 'tasks', 'IN_PROGRESS', count(*)
FROM herder.tasks WHERE status = 'IN_PROGRESS'
UNION ALL
SELECT 'jobs', status, count(*)
FROM herder.jobs WHERE status = ANY(:job_statuses::text[])
GROUP BY status;

-- ---------------------------------------------------------------- retention

-- name: prunable_jobs
-- Finished jobs older than the retention whose on_finished hooks have run, oldest first.
SELECT id FROM herder.jobs j
WHERE status IN ('SUCCESS', 'WARNING', 'FAILURE', 'CANCELED')
  AND NOT EXISTS (SELECT 1 FROM herder.finish_hooks h WHERE h.job_id = j.id)
  AND ended_at < clock_timestamp() - make_interval(secs => :retention_seconds)
ORDER BY ended_at
LIMIT :limit;

-- name: prune_tasks
-- One small batch per statement, so no transaction holds many locks or runs long; the
-- job's status is checked again in case it was restarted meanwhile. The batch is found
-- by the job's index and deleted by primary key (joining it to the table instead, the
-- planner hashed a scan of all of it).
DELETE FROM herder.tasks t
WHERE t.id = ANY (ARRAY(
    SELECT d.id FROM herder.tasks d
    WHERE d.job_id IN (
        SELECT id FROM herder.jobs
        WHERE id = ANY(:job_ids::bigint[])
          AND status IN ('SUCCESS', 'WARNING', 'FAILURE', 'CANCELED')
          AND ended_at < clock_timestamp() - make_interval(secs => :retention_seconds)
    )
    LIMIT :batch
));

-- name: prune_jobs
DELETE FROM herder.jobs j
WHERE id = ANY(:job_ids::bigint[])
  AND status IN ('SUCCESS', 'WARNING', 'FAILURE', 'CANCELED')
  AND NOT EXISTS (SELECT 1 FROM herder.finish_hooks h WHERE h.job_id = j.id)
  AND ended_at < clock_timestamp() - make_interval(secs => :retention_seconds);
