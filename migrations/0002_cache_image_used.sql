-- Exact-tier images are evicted on their own (policy "ours": images keep at most a share of the byte budget,
-- least recently used first; see nirvana/cache/eviction.py). image_used_ts is when a prompt's image was stored
-- or last served as an exact hit (epoch seconds of the cache's clock, like the other *_ts columns); NULL when the
-- prompt has no image. last_used_ts cannot serve: approximate hits on the prompt's states refresh it too.
ALTER TABLE cache_prompts ADD COLUMN image_used_ts double precision;

-- Existing rows: last_used_ts bounds the last exact hit from above where there was one, else the image is as
-- old as its prompt.
UPDATE cache_prompts
   SET image_used_ts = CASE WHEN exact_hits > 0 THEN last_used_ts ELSE created_ts END
 WHERE image_blob_id IS NOT NULL;

-- Phase 0 of eviction scans the images in this order.
CREATE INDEX cache_prompts_image_lru ON cache_prompts (coalesce(image_used_ts, created_ts), id)
    WHERE image_blob_id IS NOT NULL;
