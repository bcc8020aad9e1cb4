-- Effective length and the budget Alg. 1 would choose, per scored variant and round, with the
-- variant's gamma: run on replays scored at several gammas (paper Table 4's sensitivity sweep).
--   opdcache replay RUN --variant g0.8 --gamma 0.8 --no-train
--   opdcache query RUN/replays/g0.8 --file analysis/gamma_sweep.sql
SELECT s.variant, json_extract(v.params, '$.gamma')::DOUBLE AS gamma, s.round,
       avg(s.effective_len) AS mean_effective_len,
       avg(s.effective_len::DOUBLE / greatest(len(s.bad), 1)) AS retained_fraction,
       any_value(b.max_tokens) AS max_tokens,
       any_value(b.next_max_tokens) AS next_max_tokens
FROM scores s
JOIN variants v USING (variant)
LEFT JOIN budget b ON b.round = s.round
GROUP BY ALL
ORDER BY gamma, s.round;
