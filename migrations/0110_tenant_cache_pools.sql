-- Per-tenant opt-in to the shared cache pool (docs/SECURITY.md). A tenant without a row here is private: its jobs
-- resume only from its own cached states. Each job records the cache namespace tenant chosen when it was created
-- (jobs.cache_tenant: the tenant itself, or '__shared__'), so the router and the render worker of one job always
-- agree on the namespace even if the tenant's choice changes in between. NULL (jobs created before this migration)
-- falls back to the deployment-wide NIRVANA_CACHE_SHARED_POOL.
CREATE TABLE tenant_settings (
    tenant      text PRIMARY KEY CHECK (tenant <> '' AND length(tenant) <= 200),
    shared_pool boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE jobs ADD COLUMN cache_tenant text;
