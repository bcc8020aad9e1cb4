-- Tokens the rollout decoded per effective token, per round (issue 13's in-flight figure): decoded =
-- the rollout stage's generated_tokens (cut-off tokens of in-flight stops included; the stored
-- response lengths where a stage line predates that field; summed over a sharded rollout's workers,
-- view stage_walls), E from the variant that drives the
-- budget (scores of metric none, OPD's and truncation's, count every position: ratio 1 by definition).
--   opdcache query RUN --file analysis/generated_per_effective.sql
WITH decoded AS (
    SELECT round, sum(generated_tokens) AS generated FROM stage_walls
    WHERE run = 'main' AND stage = 'rollout' GROUP BY round
), stored AS (
    SELECT round, sum(response_len) AS tokens FROM rollouts GROUP BY round
), effective AS (
    SELECT round, variant, sum(effective_len) AS e FROM scores GROUP BY round, variant
)
SELECT s.round, e.variant, coalesce(d.generated, s.tokens) AS generated, s.tokens AS stored, e.e AS effective,
       coalesce(d.generated, s.tokens) / e.e AS generated_per_effective
FROM stored s JOIN effective e USING (round) LEFT JOIN decoded d USING (round)
ORDER BY s.round, e.variant;
