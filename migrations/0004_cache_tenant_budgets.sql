-- Per-tenant byte budgets (NIRVANA_CACHE_TENANT_BUDGET_BYTES, nirvana/cache/index.py evict_to_budget): eviction
-- sums each tenant's blob bytes, then, for a tenant over its budget, scans only that tenant's blobs (its states
-- join on blob_id, its images on image_blob_id). Without this index both read every blob of every tenant; with
-- it the sum is an index-only scan and the candidate scans grow with the tenant, not with the table.
-- (Exact search of small namespaces reads them through the existing cache_prompts_ns btree.)
CREATE INDEX cache_blobs_tenant ON cache_blobs (tenant) INCLUDE (bytes);
