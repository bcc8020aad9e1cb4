-- Avg@n accuracy of each evaluated checkpoint against the wall time spent producing it (paper Fig. 1
-- / Fig. 4): every stage of the rounds before it, evaluation excluded except an engine start-up it
-- made (view stage_walls' train_seconds: a run that evaluates before its first rollout would otherwise
-- look a start-up faster; the demo's verdicts count it the same way). work_seconds leaves out every
-- one-time start-up (a fixed cost that dominates tiny CPU rounds). A sharded stage's wall is its
-- slowest worker's (view stage_walls).
--   opdcache query RUN --file analysis/accuracy_vs_time.sql [--param run_label=main]
WITH per_round AS (
    SELECT round, sum(train_seconds) AS seconds, sum(train_work_seconds) AS work_seconds
    FROM stage_walls
    WHERE run = coalesce(getvariable('run_label'), 'main')
    GROUP BY round
)
SELECT e.round,
       coalesce((SELECT sum(p.seconds) FROM per_round p WHERE p.round < e.round), 0) AS wall_seconds,
       coalesce((SELECT sum(p.work_seconds) FROM per_round p WHERE p.round < e.round), 0) AS work_seconds,
       e.accuracy, e.pass_at_n, e.n, e.prompts, e.mean_response_tokens, e.truncated
FROM evals e
ORDER BY e.round;
