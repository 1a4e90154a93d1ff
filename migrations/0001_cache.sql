-- Approximate cache: prompts (with embeddings), captured states, blobs (latents and final images), a job ledger
-- for idempotent recording, and persisted novelty-gate models.
--
-- Namespaces: an entry is only reusable within one (model_key, tenant, embed_space). pgvector applies WHERE
-- filters after the HNSW scan, so lookups enable iterative scans (pgvector >= 0.8, see nirvana/cache/index.py).
-- Times used by eviction policies are epoch seconds (double precision) so a trace replay can supply its own clock.

CREATE EXTENSION IF NOT EXISTS vector;

-- One stored object (or a virtual one: uri NULL, bytes > 0, for trace replays). Several state rows may share a
-- blob: after a hit at K the new prompt's states k <= K borrow the source's blobs. Blobs are deleted only when
-- no row references them; their files are deleted after the rows (orphans are swept).
CREATE TABLE cache_blobs (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('state', 'image')),
    uri         text UNIQUE,
    codec       text NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    checksum    text,
    model_key   text NOT NULL,
    tenant      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cache_prompts (
    id               bigserial PRIMARY KEY,
    model_key        text NOT NULL,
    tenant           text NOT NULL,
    embed_space      text NOT NULL,
    dim              integer NOT NULL CHECK (dim > 0),
    embedding        vector NOT NULL CHECK (vector_dims(embedding) = dim),
    prompt           text NOT NULL,
    negative_prompt  text NOT NULL DEFAULT '',
    seed             bigint NOT NULL,
    steps            integer NOT NULL CHECK (steps > 0),
    guidance         double precision NOT NULL,
    width            integer NOT NULL,
    height           integer NOT NULL,
    exact_key        text NOT NULL,
    image_blob_id    bigint REFERENCES cache_blobs (id) ON DELETE SET NULL,
    job_id           text,
    source_prompt_id bigint,  -- no FK: the source may be evicted first
    hit_k            integer,
    exact_hits       bigint NOT NULL DEFAULT 0,
    created_ts       double precision NOT NULL,
    last_used_ts     double precision NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cache_prompts_ns ON cache_prompts (model_key, tenant, embed_space);
CREATE INDEX cache_prompts_exact ON cache_prompts (model_key, tenant, exact_key);
CREATE INDEX cache_prompts_image ON cache_prompts (image_blob_id);
-- HNSW cosine index for 384-d embeddings (MiniLM). Other dimensions get their own partial index at run time
-- (CacheIndex.ensure_vector_index); queries use the same expression and a literal "dim = N" predicate.
CREATE INDEX cache_prompts_hnsw_384 ON cache_prompts
    USING hnsw ((embedding::vector(384)) vector_cosine_ops) WHERE dim = 384;

CREATE TABLE cache_states (
    id               bigserial PRIMARY KEY,
    prompt_id        bigint NOT NULL REFERENCES cache_prompts (id) ON DELETE CASCADE,
    blob_id          bigint NOT NULL REFERENCES cache_blobs (id) ON DELETE CASCADE,
    k                integer NOT NULL CHECK (k > 0),
    num_steps        integer NOT NULL CHECK (num_steps > k),
    timestep         double precision NOT NULL,
    sigma            double precision,
    scheduler_family text NOT NULL,
    shape            integer[] NOT NULL,
    borrowed         boolean NOT NULL DEFAULT false,
    hits             bigint NOT NULL DEFAULT 0,
    -- The paper's LCBFU score, k x hit frequency (new states enter at 0).
    score            double precision GENERATED ALWAYS AS (k::double precision * hits) STORED,
    -- Exponentially decayed use count ("ours"): value as of dhits_ts.
    dhits            double precision NOT NULL DEFAULT 0,
    dhits_ts         double precision NOT NULL,
    created_ts       double precision NOT NULL,
    last_used_ts     double precision NOT NULL,
    last_hit_at      timestamptz,
    UNIQUE (prompt_id, k)
);
CREATE INDEX cache_states_blob ON cache_states (blob_id);

-- Idempotency ledger: a job is recorded at most once, so a redelivered job never double-counts a hit.
CREATE TABLE cache_jobs (
    job_id        text PRIMARY KEY,
    tier          text NOT NULL,
    prompt_id     bigint,
    hit_state_id  bigint,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);

-- Novelty gates (one-class SVM), persisted so every router process uses the latest fit.
CREATE TABLE cache_gate_models (
    model_key    text NOT NULL,
    tenant       text NOT NULL,
    embed_space  text NOT NULL,
    n_samples    integer NOT NULL,
    fitted_ts    double precision NOT NULL,
    model        bytea NOT NULL,
    PRIMARY KEY (model_key, tenant, embed_space)
);
