-- Outcome rewards per round and variant (variants scored with an outcome checker: arms prune-grpo and
-- grpo, score.outcome): mean outcome (the rollouts' accuracy), mean |GRPO advantage|, the share of
-- prompts whose samples all scored alike (zero-variance groups: advantage 0, only the OPD term teaches
-- them), and mean response length.
--   opdcache query RUN --file analysis/outcome_per_round.sql
WITH groups AS (
    SELECT variant, round, prompt_id, min(outcome) = max(outcome) AS zero_variance
    FROM scores WHERE outcome IS NOT NULL GROUP BY ALL
)
SELECT s.variant, s.round, count(*) AS responses, avg(s.outcome) AS mean_outcome,
       avg(abs(s.grpo_advantage)) AS mean_abs_advantage,
       (SELECT avg(g.zero_variance::INTEGER) FROM groups g WHERE g.variant = s.variant AND g.round = s.round)
           AS zero_variance_groups,
       avg(len(s.weight)) AS mean_response_len
FROM scores s
WHERE s.outcome IS NOT NULL
GROUP BY s.variant, s.round
ORDER BY s.variant, s.round;
