-- Distillation metrics of each evaluated checkpoint (eval.teacher / opdcache eval --teacher) against
-- the wall time spent producing it, counted as in accuracy_vs_time.sql: the top-k reverse KL to the
-- teacher on the student's own samples of the held-out prompts, the full-vocabulary reverse KL at
-- the same prefixes, the sampled estimate of it (sample_kl = teacher_nll - student_nll at the sampled tokens), their top-k overlap,
-- length and stop rate. Rounds evaluated without a teacher are left out.
--   opdcache query RUN --file analysis/distill_vs_time.sql [--param run_label=main]
WITH per_round AS (
    SELECT round, sum(train_seconds) AS seconds, sum(train_work_seconds) AS work_seconds
    FROM stage_walls
    WHERE run = coalesce(getvariable('run_label'), 'main')
    GROUP BY round
)
SELECT e.round,
       coalesce((SELECT sum(p.seconds) FROM per_round p WHERE p.round < e.round), 0) AS wall_seconds,
       coalesce((SELECT sum(p.work_seconds) FROM per_round p WHERE p.round < e.round), 0) AS work_seconds,
       e.topk_kl, e.full_kl, e.sample_kl, e.teacher_nll, e.student_nll, e.overlap, e.mean_response_tokens, e.stop_rate, e.accuracy, e.boxed_rate
FROM evals e
WHERE e.topk_kl IS NOT NULL
ORDER BY e.round;
