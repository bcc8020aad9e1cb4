-- Mean top-k overlap by depth band, per round (paper App. A.12, Fig. 7).
-- Bands are contiguous [lo, hi) ranges of `band_scale` response positions (default 1000), so every
-- position falls in exactly one band; `band` is labelled in tokens (e.g. '0-1000', '1000-2000').
-- Overlap is a property of the cache, so any variant that stores it gives the same numbers;
-- `variant` picks one (default: the first variant with an overlap column).
--   opdcache query RUN --file analysis/overlap_by_depth.sql [--param band_scale=1000] [--param variant=prune]
WITH chosen AS (
    SELECT coalesce(getvariable('variant'), min(variant)) AS variant
    FROM scores WHERE overlap IS NOT NULL
),
banded AS (
    SELECT t.round, t.overlap, coalesce(getvariable('band_scale'), 1000)::BIGINT AS scale,
           t.pos // coalesce(getvariable('band_scale'), 1000)::BIGINT AS band_index
    FROM tokens t JOIN chosen c ON t.variant = c.variant
)
SELECT round, printf('%d-%d', band_index * scale, (band_index + 1) * scale) AS band,
       band_index * scale AS band_start, avg(overlap) AS mean_overlap, count(*) AS positions
FROM banded
GROUP BY round, band_index, scale
ORDER BY round, band_index;
