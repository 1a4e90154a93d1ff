-- Maintenance runs on its own queue and worker (docs/SERVICE.md). Long jobs are incremental: each run does a
-- bounded slice and keeps where it stopped here (e.g. the orphan sweep's next shard of the object store).
CREATE TABLE maintenance_state (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Retention scans finished jobs by age: jobs_finished (0100) serves it.
-- The maintenance worker heart-beats like the others.
ALTER TABLE worker_heartbeats DROP CONSTRAINT worker_heartbeats_role_check;
ALTER TABLE worker_heartbeats ADD CONSTRAINT worker_heartbeats_role_check
    CHECK (role IN ('router', 'render', 'maintenance'));
