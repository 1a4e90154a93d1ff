-- Bounded routing and bounded re-sends (docs/RELIABILITY.md):
-- jobs.route_attempts: route claims so far; a job whose route task keeps failing ends 'failed' with the reason
--   (jobs.route_error: the last error) after NIRVANA_MAX_ROUTE_ATTEMPTS instead of being re-sent forever.
-- jobs.lease_until / jobs.resends: a queued/routing/routed job is re-sent by the reaper only once its lease ran
--   out, and each re-send doubles the next lease: one outstanding message per job, even in a long backlog.
--   NULL lease: the job's last transition (which sent a message) is the lease start (updated_at).
ALTER TABLE jobs ADD COLUMN route_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN route_error text;
ALTER TABLE jobs ADD COLUMN lease_until timestamptz;
ALTER TABLE jobs ADD COLUMN resends integer NOT NULL DEFAULT 0;

-- Two checkpoints of one served name coexist during a rolling deploy (each its own queue); new jobs go to the
-- most recently registered one that is alive, so workers of the old and new checkpoint no longer overwrite one
-- row in turn.
ALTER TABLE served_models DROP CONSTRAINT served_models_pkey;
ALTER TABLE served_models ADD PRIMARY KEY (name, checkpoint_id);
