-- Effective length E (eq. 12) per variant and round, beside the response length, the budget M_t
-- the round was sampled under, and the retained token fraction (paper Fig. 3 / Fig. 6).
--   opdcache query RUN --file analysis/effective_len_per_round.sql
SELECT s.variant, s.round, count(*) AS responses,
       max(r.max_tokens) AS max_tokens,
       avg(r.response_len) AS mean_response_len,
       avg(s.effective_len) AS mean_effective_len,
       min(s.effective_len) AS min_effective_len,
       max(s.effective_len) AS max_effective_len,
       sum(s.effective_len) / sum(r.response_len) AS retained_fraction,
       any_value(b.hit_ratio) AS hit_ratio,
       any_value(b.next_max_tokens) AS next_max_tokens
FROM scores s
JOIN rollouts r USING (round, prompt_id, sample)
LEFT JOIN budget b ON b.round = s.round
GROUP BY ALL
ORDER BY s.variant, s.round;
