-- Leave room on each page so that updates of unindexed columns are HOT (heap-only tuples: no new index entries).
-- Every hit updates its state's counters (hits, dhits, last_used_ts) and its prompt's last_used_ts; with full
-- pages such an update writes a new tuple elsewhere and inserts it into every index of the table — for
-- cache_prompts that includes the HNSW index, so each hit re-inserted the prompt's vector (the costliest write
-- of the cache path) and left a dead entry in the graph. Measured on a trace replay (policy "ours", 20,831
-- prompts): 30,699 prompt updates, 14 % of them HOT. A prompt row is ~1.8 kB (the 384-d vector is 1.5 kB), so
-- 70 % leaves one free slot on a page of four; a state row is ~0.15 kB.
-- Applies to pages written from now on; VACUUM FULL (an exclusive lock) rewrites existing ones.
ALTER TABLE cache_prompts SET (fillfactor = 70);
ALTER TABLE cache_states SET (fillfactor = 80);
