-- The render path never fails a good job for the cache's sake (docs/RELIABILITY.md):
-- jobs.cache_fallback: why a planned approximate hit rendered from noise instead ('missing': the state's row or
--   object is gone; 'error': loading it raised; 'rejected': the engine refused it — other model_key or shape,
--   non-finite values). NULL: no fallback. Counted in /metrics (nirvana_cache_fallbacks_total{reason}).
-- jobs.cache_record_error: recording a finished job's states failed after its retries (the job stays done; the
--   cache just does not learn from it). Counted in /metrics (nirvana_cache_record_failures_total).
ALTER TABLE jobs ADD COLUMN cache_fallback text CHECK (cache_fallback IN ('missing', 'error', 'rejected'));
ALTER TABLE jobs ADD COLUMN cache_record_error text;
