-- Job service: API keys, served models, batches and jobs (see docs/SERVICE.md).
--
-- Postgres is the source of truth for job state (never the Celery result backend). Every state change is a
-- guarded UPDATE (WHERE status = <expected> [AND attempts = <expected>]), so a redelivered task is harmless.
--
--   queued ──route──▶ routing ──▶ routed ──claim──▶ rendering ──▶ done
--      │                 │           │                  │  └────▶ failed (error, or max attempts)
--      └─────────────────┴───────────┴──── cancelled ◀──┘ (between denoising steps)
--   routing ──exact tier──▶ done (the router serves an exact hit itself)
--   rendering ──(heartbeat stale: worker died)──reaper──▶ routed (attempts < max) | failed

-- API keys: only a SHA-256 of the key is stored (keys are 192-bit random tokens, so a fast hash is enough).
CREATE TABLE api_keys (
    id           bigserial PRIMARY KEY,
    tenant       text NOT NULL CHECK (tenant <> '' AND length(tenant) <= 200),
    key_hash     text NOT NULL UNIQUE,
    prefix       text NOT NULL,
    name         text NOT NULL DEFAULT '',
    role         text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- Models served by at least one render worker (registered at worker start). ``queue`` is
-- ``render.<model_key at the native size>``: the router sends only to queues registered here.
CREATE TABLE served_models (
    name             text PRIMARY KEY,
    ref              text NOT NULL,
    checkpoint_id    text NOT NULL,
    scheduler_family text NOT NULL,
    height           integer NOT NULL CHECK (height > 0),
    width            integer NOT NULL CHECK (width > 0),
    size_multiple    integer NOT NULL CHECK (size_multiple > 0),
    default_guidance double precision NOT NULL,
    queue            text NOT NULL,
    registered_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE batches (
    id               text PRIMARY KEY,
    tenant           text NOT NULL,
    total            integer NOT NULL CHECK (total >= 0),
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX batches_tenant ON batches (tenant, created_at);

CREATE TABLE jobs (
    id                text PRIMARY KEY,              -- also the Celery task id
    tenant            text NOT NULL,
    batch_id          text REFERENCES batches (id) ON DELETE CASCADE,
    batch_index       integer,
    idempotency_key   text,
    request_hash      text NOT NULL,
    status            text NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'routing', 'routed', 'rendering', 'done', 'failed', 'cancelled')),
    -- the request (seed always concrete: assigned by the API when absent)
    prompt            text NOT NULL,
    negative_prompt   text NOT NULL DEFAULT '',
    seed              bigint NOT NULL,
    steps             integer NOT NULL CHECK (steps > 0),
    guidance          double precision NOT NULL,
    width             integer NOT NULL,
    height            integer NOT NULL,
    model             text NOT NULL,
    model_key         text NOT NULL,
    render_queue      text NOT NULL,
    cache_mode        text NOT NULL CHECK (cache_mode IN ('auto', 'exact', 'off')),
    -- the router's plan (cache outcome)
    tier              text CHECK (tier IN ('exact', 'approximate', 'miss')),
    k                 integer,
    k_policy          integer,
    similarity        double precision,
    source_prompt_id  bigint,
    source_job_id     text,                          -- only when the source belongs to the same tenant
    state_id          bigint,
    image_blob_id     bigint,
    exact_key         text,
    embedding         bytea,                         -- float32, so the render worker need not re-embed
    lookup_ms         double precision,
    gate_novel        boolean,
    -- rendering
    attempts          integer NOT NULL DEFAULT 0,
    worker            text,
    heartbeat_at      timestamptz,
    cancel_requested  boolean NOT NULL DEFAULT false,
    progress_step     integer NOT NULL DEFAULT 0,
    start_step        integer,
    steps_run         integer,
    engine_s          double precision,
    image_uri         text,
    image_bytes       integer,
    error             text,
    -- timings
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    enqueued_at       timestamptz,
    routed_at         timestamptz,
    render_started_at timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at);
CREATE INDEX jobs_batch ON jobs (batch_id, batch_index) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_active ON jobs (status, updated_at) WHERE status IN ('queued', 'routing', 'routed', 'rendering');
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
