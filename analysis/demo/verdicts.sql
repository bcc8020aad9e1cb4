-- The paper's claims, each with the demo's verdict (issue 14), computed from the demo's run
-- directories: OUT/runs/<pair>-<arm>-s<seed>/ (eval results, stage times, budget decisions, replays).
--   duckdb -c "SET VARIABLE runs = 'demo/runs'; .read analysis/demo/verdicts.sql"
-- Accuracy is Avg@n of the last evaluated round. Every arm of a pair answers the same eval prompts,
-- so a difference (two arms of one seed, or OPD's final round against its round 0) is taken prompt by
-- prompt (a paired comparison: how hard a prompt is cancels): per seed, the mean of the per-prompt
-- differences with s.e. = their s.d. / sqrt(prompts); the seeds are the replicates: the mean over seeds
-- with s.e. = the larger of their s.d. over seeds / sqrt(seeds) and the pooled within-seed s.e.
-- (sqrt(sum of the seeds' squared s.e.) / seeds). Only prompts both evaluations answered count. With
-- fewer than 3 seeds no claim holds or fails (holds is NULL, needs_seeds true: "needs >= 3 seeds").
-- Wall time is every stage but evaluation (an engine start made by evaluation counts: the run's one
-- engine serves its rollouts too); work time is wall time less every one-time start-up (the engine,
-- the teacher, the trainer), which a long run (the paper's 200+ rounds) amortises to nothing while
-- the demo's few rounds do not.
WITH runs AS (
    SELECT DISTINCT regexp_extract(filename, '([^/]+)/config\.yaml$', 1) AS run
    FROM glob(getvariable('runs') || '/*/config.yaml') t(filename)
), ids AS (
    SELECT run, regexp_extract(run, '^([A-Za-z0-9]+)-', 1) AS pair,
           regexp_extract(run, '^[A-Za-z0-9]+-(.+)-s[0-9]+$', 1) AS arm,
           regexp_extract(run, '-s([0-9]+)$', 1)::INTEGER AS seed
    FROM runs
), evals AS (
    SELECT regexp_extract(filename, '([^/]+)/eval/round=', 1) AS run,
           regexp_extract(filename, 'round=([0-9]+)', 1)::INTEGER AS round, per_prompt
    FROM read_json(getvariable('runs') || '/*/eval/round=*.json', filename = true,
                   columns = {accuracy: 'DOUBLE', per_prompt: 'JSON'})
), ends AS (  -- each run's first and last evaluation, prompt by prompt
    SELECT e.run, e.round = b.first AS is_start, e.round = b.last AS is_final, j.key AS prompt,
           j.value::DOUBLE AS acc
    FROM evals e JOIN (SELECT run, min(round) AS first, max(round) AS last FROM evals GROUP BY run) b
        ON e.run = b.run AND e.round IN (b.first, b.last),
         json_each(e.per_prompt) j
), times AS (
    SELECT regexp_extract(filename, '([^/]+)/stage_times\.jsonl$', 1) AS run,
           sum(CASE WHEN stage = 'eval' THEN seconds - coalesce(work_seconds, seconds) ELSE seconds END) AS wall,
           sum(CASE WHEN stage = 'eval' THEN 0 ELSE coalesce(work_seconds, seconds) END) AS work
    FROM read_json(getvariable('runs') || '/*/stage_times.jsonl', format = 'newline_delimited',
                   filename = true, ignore_errors = true,
                   columns = {run: 'VARCHAR', stage: 'VARCHAR', seconds: 'DOUBLE', work_seconds: 'DOUBLE'})
    WHERE run = 'main' GROUP BY ALL
), budget AS (
    SELECT regexp_extract(filename, '([^/]+)/budget\.json$', 1) AS run,
           max(h.max_tokens) AS max_budget, arg_min(h.max_tokens, h.round) AS first_budget,
           arg_max(h.effective_len_mean, h.round) AS last_e
    FROM (SELECT filename, unnest(history) AS h
          FROM read_json(getvariable('runs') || '/*/budget.json', filename = true))
    GROUP BY ALL
), sweep AS (  -- score-only replays gamma<g>: mean E over the rounds
    SELECT regexp_extract(filename, '([^/]+)/replays/gamma', 1) AS run,
           regexp_extract(filename, 'replays/gamma([0-9.]+)/', 1)::DOUBLE AS gamma,
           avg(h.effective_len_mean) AS mean_e
    FROM (SELECT filename, unnest(history) AS h
          FROM read_json(getvariable('runs') || '/*/replays/gamma*/budget.json', filename = true))
    GROUP BY ALL
), arm AS (
    SELECT i.*, t.wall, t.work, b.max_budget, b.first_budget, b.last_e
    FROM ids i LEFT JOIN times t USING (run) LEFT JOIN budget b USING (run)
), labelled AS (  -- each run's last evaluation under its arm, its first under <arm>@start
    SELECT i.pair, i.seed, i.arm AS label, e.prompt, e.acc
    FROM ids i JOIN ends e ON e.run = i.run AND e.is_final
    UNION ALL
    SELECT i.pair, i.seed, i.arm || '@start', e.prompt, e.acc
    FROM ids i JOIN ends e ON e.run = i.run AND e.is_start
), seed_diff AS (  -- evaluation x minus evaluation y, one seed, prompt by prompt
    SELECT x.pair, x.label AS x, y.label AS y, x.seed, avg(x.acc - y.acc) AS d,
           var_samp(x.acc - y.acc) / count(*) AS v
    FROM labelled x JOIN labelled y
        ON x.pair = y.pair AND x.seed = y.seed AND x.label <> y.label AND x.prompt = y.prompt
    GROUP BY ALL
), acc_diff AS (  -- averaged over the seeds both ran
    SELECT pair, x, y, count(*) AS seeds, avg(d) AS acc_diff,
           greatest(coalesce(stddev_samp(d) / sqrt(count(*)), 0), sqrt(sum(v)) / count(*)) AS acc_diff_se
    FROM seed_diff GROUP BY ALL
), diff AS (  -- arm x against arm y, per pair, averaged over the seeds both ran
    SELECT x.pair, x.arm AS x, y.arm AS y, count(*) AS seeds, any_value(a.acc_diff) AS acc_diff,
           any_value(a.acc_diff_se) AS acc_diff_se,
           avg(x.wall / y.wall) AS wall_ratio, avg(x.work / y.work) AS work_ratio,
           avg(x.last_e / y.last_e) AS e_ratio
    FROM arm x JOIN arm y USING (pair, seed)
        LEFT JOIN acc_diff a ON a.pair = x.pair AND a.x = x.arm AND a.y = y.arm
    WHERE x.arm <> y.arm GROUP BY ALL
), gain AS (  -- OPD's gain over the demo: its final round minus its round 0
    SELECT pair, seeds, acc_diff AS gain, acc_diff_se AS gain_se
    FROM acc_diff WHERE x = 'opd' AND y = 'opd@start'
), mono AS (
    SELECT s.run, bool_and(s.mean_e >= coalesce(n.mean_e, s.mean_e)) AS monotone
    FROM sweep s LEFT JOIN sweep n ON n.run = s.run AND n.gamma = (
        SELECT min(gamma) FROM sweep m WHERE m.run = s.run AND m.gamma > s.gamma)
    GROUP BY s.run
), claims AS (
SELECT 'OPD teaches: accuracy gain over the demo >= 3 s.e.' AS claim, pair, seeds,
       gain AS value, gain_se AS se, gain > 3 * gain_se AS holds
FROM gain
UNION ALL
SELECT '(a) low pair: Prune-OPD wall / OPD wall <= 0.5', pair, seeds, wall_ratio, NULL, wall_ratio <= 0.5
FROM diff WHERE pair = 'low' AND x = 'prune' AND y = 'opd'
UNION ALL
SELECT '(a) low pair: Prune-OPD work / OPD work <= 0.5 (wall less one-time start-ups)', pair, seeds,
       work_ratio, NULL, work_ratio <= 0.5
FROM diff WHERE pair = 'low' AND x = 'prune' AND y = 'opd'
UNION ALL
SELECT '(a) low pair: Prune-OPD accuracy - OPD within 2 s.e. (or above)', pair, seeds, acc_diff, acc_diff_se,
       acc_diff >= -2 * acc_diff_se
FROM diff WHERE pair = 'low' AND x = 'prune' AND y = 'opd'
UNION ALL
SELECT '(a) low pair: Prune-OPD last mean E / OPD last mean length < 0.5 (E collapses)', pair, seeds,
       e_ratio, NULL, e_ratio < 0.5
FROM diff WHERE pair = 'low' AND x = 'prune' AND y = 'opd'
UNION ALL
SELECT '(b) high pair: Prune-OPD largest budget / M_0 >= 2 (the budget opens)', pair, count(*),
       avg(max_budget / first_budget), NULL, avg(max_budget / first_budget) >= 2
FROM arm WHERE pair = 'high' AND arm = 'prune' GROUP BY pair
UNION ALL
SELECT '(b) high pair: Prune-OPD wall / OPD wall within 0.85-1.15', pair, seeds, wall_ratio, NULL,
       wall_ratio BETWEEN 0.85 AND 1.15
FROM diff WHERE pair = 'high' AND x = 'prune' AND y = 'opd'
UNION ALL
SELECT '(c) gamma sweep: mean E falls as gamma rises (runs monotone / runs)', i.pair, count(*),
       avg(m.monotone::INTEGER), NULL, bool_and(m.monotone)
FROM mono m JOIN ids i USING (run) GROUP BY i.pair
UNION ALL
SELECT '(d) high pair: Prune-OPD accuracy - truncation >= 2 s.e.', pair, seeds, acc_diff, acc_diff_se,
       acc_diff > 2 * acc_diff_se
FROM diff WHERE pair = 'high' AND x = 'prune' AND y = 'truncate'
UNION ALL
SELECT '(e) low pair: top-p wall / overlap wall > 1 (overlap saves more time)', pair, seeds, 1 / wall_ratio,
       NULL, wall_ratio < 1
FROM diff WHERE pair = 'low' AND x = 'prune' AND y = 'prune-topp'
UNION ALL
SELECT '(f) low pair: Prune-OPD accuracy - random pruning >= 2 s.e.', pair, seeds, acc_diff, acc_diff_se,
       acc_diff > 2 * acc_diff_se
FROM diff WHERE pair = 'low' AND x = 'prune' AND y = 'random'
UNION ALL
SELECT 'in flight: low pair Prune-OPD in flight wall / OPD wall <= 0.5', pair, seeds, wall_ratio, NULL,
       wall_ratio <= 0.5
FROM diff WHERE pair = 'low' AND x = 'prune-inflight' AND y = 'opd'
UNION ALL
SELECT 'in flight: low pair accuracy in flight - Prune-OPD within 2 s.e. (or above)', pair, seeds, acc_diff,
       acc_diff_se, acc_diff >= -2 * acc_diff_se
FROM diff WHERE pair = 'low' AND x = 'prune-inflight' AND y = 'prune'
UNION ALL  -- issue 24: OPD x L where the teacher is reliable, GRPO on the outcome where R = 0
SELECT 'hybrid: accuracy prune-grpo - ' || y || ' >= 2 s.e.' || CASE WHEN y = 'truncate' THEN ' (hypothesis: >= 0)'
       ELSE '' END, pair, seeds, acc_diff, acc_diff_se,
       CASE WHEN y = 'truncate' THEN acc_diff >= 0 ELSE acc_diff > 2 * acc_diff_se END
FROM diff WHERE x = 'prune-grpo' AND y IN ('prune', 'truncate', 'grpo')
UNION ALL
SELECT 'hybrid: wall prune-grpo / Prune-OPD <= 1.1', pair, seeds, wall_ratio, NULL, wall_ratio <= 1.1
FROM diff WHERE x = 'prune-grpo' AND y = 'prune'
UNION ALL  -- issue 30: the same arm with the default objective against the paper's loss (student-topk)
SELECT 'objective: accuracy ' || x || ' - ' || y || ' >= 2 s.e.', pair, seeds, acc_diff, acc_diff_se,
       acc_diff > 2 * acc_diff_se
FROM diff WHERE x LIKE '%.%' AND y = split_part(x, '.', 1)
)
SELECT claim, pair, seeds, value, se, CASE WHEN seeds >= 3 THEN holds END AS holds, seeds < 3 AS needs_seeds
FROM claims
ORDER BY claim, pair;
