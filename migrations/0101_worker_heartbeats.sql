-- Liveness of worker processes (routers and render workers), written every few seconds once a worker's consumer
-- is up. /readyz reports the live ones; `nirvana up` waits for at least one of each before declaring ready.
CREATE TABLE worker_heartbeats (
    name         text PRIMARY KEY,
    role         text NOT NULL CHECK (role IN ('router', 'render')),
    queue        text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX worker_heartbeats_role ON worker_heartbeats (role, heartbeat_at);
