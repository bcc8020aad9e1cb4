-- Budget controller per round (Alg. 1): the budget M_t each round was sampled under, the mean
-- effective length that drove the decision, the hit ratio and the next budget (paper Fig. 6).
--   opdcache query RUN --file analysis/budget_per_round.sql
SELECT round, max_tokens, boundary, effective_len_mean, hit_ratio, action, next_max_tokens
FROM budget
ORDER BY round;
