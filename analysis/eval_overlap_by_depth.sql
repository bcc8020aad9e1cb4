-- Top-k overlap and top-k reverse KL by depth band on the student's own samples of the held-out
-- prompts, per evaluated round (eval.teacher; band width eval.band tokens): where along a response the
-- student and the teacher stop sharing candidates, and whether training moves that.
--   opdcache query RUN --file analysis/eval_overlap_by_depth.sql
SELECT e.round, o.key::INTEGER AS band_start, e.band, o.value AS mean_overlap,
       e.kl_by_band[o.key] AS mean_topk_kl
FROM evals e, (SELECT round, unnest(map_entries(overlap_by_band)) AS o FROM evals) x(round, o)
WHERE e.round = x.round AND e.topk_kl IS NOT NULL
ORDER BY e.round, band_start;
