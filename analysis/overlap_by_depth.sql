-- Mean top-k overlap by depth band, per round (paper App. A.12, Fig. 7).
-- Bands are the paper's 0-1K, 2-3K, 4-6K and 7-8K response positions, [lo, hi) in units of
-- `band_scale` tokens (default 1000; e.g. --param band_scale=64 for short toy responses).
-- Overlap is a property of the cache, so any variant that stores it gives the same numbers;
-- `variant` picks one (default: the first variant with an overlap column).
--   opdcache query RUN --file analysis/overlap_by_depth.sql [--param band_scale=1000] [--param variant=prune]
WITH bands(band, lo, hi) AS (VALUES ('0-1K', 0, 1), ('2-3K', 2, 3), ('4-6K', 4, 6), ('7-8K', 7, 8)),
chosen AS (
    SELECT coalesce(getvariable('variant'), min(variant)) AS variant
    FROM scores WHERE overlap IS NOT NULL
)
SELECT t.round, b.band, avg(t.overlap) AS mean_overlap, count(*) AS positions
FROM tokens t
JOIN chosen c ON t.variant = c.variant
JOIN bands b
  ON t.pos >= b.lo * coalesce(getvariable('band_scale'), 1000)
 AND t.pos < b.hi * coalesce(getvariable('band_scale'), 1000)
GROUP BY t.round, b.band, b.lo
ORDER BY t.round, b.lo;
