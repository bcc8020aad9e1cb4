-- Mean loss weight L (eq. 10) and reliability R (eq. 9) by response position, per variant and
-- round (paper Fig. 8, left). Positions are grouped into buckets of `bucket` tokens (default 256).
-- Only generated positions count: padding (L = 0) is not part of the cache.
--   opdcache query RUN --file analysis/weight_by_position.sql [--param bucket=256]
SELECT variant, round,
       (pos // coalesce(getvariable('bucket'), 256)) * coalesce(getvariable('bucket'), 256) AS pos_start,
       avg(L) AS mean_weight, avg(R) AS mean_reliability, count(*) AS positions
FROM tokens
WHERE variant IS NOT NULL
GROUP BY ALL
ORDER BY variant, round, pos_start;
