-- The real-pair demo's claims (issues 23, 30, 33 and 40), computed from OUT/runs/<pair>-<arm>.<objective>-s<seed>/
-- of `opdcache demo --real`: eval results with the distillation metrics, stage times.
--   duckdb -c "SET VARIABLE runs = 'demo-real/runs'; .read analysis/demo/real_verdicts.sql"
-- Metrics, each per prompt on the student's own samples of the held-out probe set: the full-vocabulary
-- reverse KL to the teacher (per_prompt_full_kl), the top-k reverse KL (per_prompt_kl: what the
-- paper's objective optimises) and the teacher's NLL of the student's samples (per_prompt_nll: does the
-- student write what the teacher would). Every run of a pair and seed evaluates the same probe prompts,
-- so a difference is taken prompt by prompt inside a seed (paired); the seeds are the replicates:
-- value = the mean over seeds of the per-seed paired differences, s.e. = the larger of their s.d. over
-- seeds / sqrt(seeds) and the pooled within-seed s.e. (sqrt(sum of squared s.e.) / seeds). With fewer
-- than 3 seeds no claim holds or fails: the verdict is "needs >= 3 seeds" (except the teacher against the
-- round-0 student: two fixed checkpoints, nothing trained, the prompts are the replicates). Wall time is every stage but
-- evaluation (an engine start made by evaluation counts), as in verdicts.sql. relative = value over the
-- reference's mean (round 0's, or the run compared with). Accuracy (per_prompt: the task's checker) is
-- measured against the teacher's on the same probe prompts, OUT/runs/teacher/eval/round=0.json (written
-- by the demo; not a run), paired with every seed's students: the accuracy claims' relative is the
-- share of the teacher-student gap at round 0 that the run closed.
WITH runs AS (
    SELECT DISTINCT regexp_extract(filename, '([^/]+)/config\.yaml$', 1) AS run
    FROM glob(getvariable('runs') || '/*/config.yaml') t(filename)
), ids AS (
    SELECT run, regexp_extract(run, '^([A-Za-z0-9]+)-', 1) AS pair,
           regexp_extract(run, '^[A-Za-z0-9]+-(.+)-s[0-9]+$', 1) AS label,
           regexp_extract(run, '^[A-Za-z0-9]+-([a-z-]+)\.', 1) AS arm,
           regexp_extract(run, '\.([a-z-]+)-s[0-9]+$', 1) AS objective,
           regexp_extract(run, '-s([0-9]+)$', 1)::INTEGER AS seed
    FROM runs
), all_evals AS (
    SELECT regexp_extract(filename, '([^/]+)/eval/round=', 1) AS run,
           regexp_extract(filename, 'round=([0-9]+)', 1)::INTEGER AS round, topk_kl, per_prompt,
           per_prompt_kl, per_prompt_full_kl, per_prompt_nll
    FROM read_json(getvariable('runs') || '/*/eval/round=*.json', filename = true,
                   columns = {topk_kl: 'DOUBLE', per_prompt: 'JSON', per_prompt_kl: 'JSON',
                              per_prompt_full_kl: 'JSON', per_prompt_nll: 'JSON'})
), evals AS (
    SELECT * FROM all_evals WHERE topk_kl IS NOT NULL AND run <> 'teacher'
), labelled AS (  -- each run's last evaluation under its label, its first under <label>@start
    SELECT i.pair, i.seed, CASE WHEN e.round = b.last THEN i.label ELSE i.label || '@start' END AS label,
           m.metric, j.key AS prompt, j.value::DOUBLE AS v
    FROM ids i JOIN evals e ON e.run = i.run
        JOIN (SELECT run, min(round) AS first, max(round) AS last FROM evals GROUP BY run) b
            ON b.run = e.run AND e.round IN (b.first, b.last) AND b.first < b.last,
         (VALUES ('full KL'), ('top-k KL'), ('teacher NLL'), ('accuracy')) m(metric),
         json_each(CASE m.metric WHEN 'top-k KL' THEN e.per_prompt_kl WHEN 'full KL' THEN e.per_prompt_full_kl
                   WHEN 'accuracy' THEN e.per_prompt ELSE e.per_prompt_nll END) j
    UNION ALL  -- the teacher's accuracy, beside every pair and seed
    SELECT s.pair, s.seed, 'teacher', 'accuracy', j.key, j.value::DOUBLE
    FROM all_evals t, (SELECT DISTINCT pair, seed FROM ids) s, json_each(t.per_prompt) j
    WHERE t.run = 'teacher'
), seed_diff AS (  -- evaluation x minus evaluation y, one seed, prompt by prompt
    SELECT x.pair, x.metric, x.label AS x, y.label AS y, x.seed, avg(x.v - y.v) AS d,
           var_samp(x.v - y.v) / count(*) AS v, avg(y.v) AS y_mean
    FROM labelled x JOIN labelled y
        ON x.pair = y.pair AND x.metric = y.metric AND x.seed = y.seed AND x.label <> y.label
           AND x.prompt = y.prompt
    GROUP BY ALL
), diff AS (
    SELECT pair, metric, x, y, count(*) AS seeds, avg(d) AS d,
           greatest(coalesce(stddev_samp(d) / sqrt(count(*)), 0), sqrt(sum(v)) / count(*)) AS se,
           avg(y_mean) AS y_mean
    FROM seed_diff GROUP BY ALL
), times AS (
    SELECT regexp_extract(filename, '([^/]+)/stage_times\.jsonl$', 1) AS run,
           sum(CASE WHEN stage = 'eval' THEN seconds - coalesce(work_seconds, seconds) ELSE seconds END) AS wall
    FROM read_json(getvariable('runs') || '/*/stage_times.jsonl', format = 'newline_delimited',
                   filename = true, ignore_errors = true,
                   columns = {run: 'VARCHAR', stage: 'VARCHAR', seconds: 'DOUBLE', work_seconds: 'DOUBLE'})
    WHERE run = 'main' GROUP BY ALL
), wall AS (  -- run x's wall over OPD's with the same objective, averaged over the seeds both ran
    SELECT x.pair, x.label, avg(tx.wall / ty.wall) AS wall_ratio
    FROM ids x JOIN ids y ON x.pair = y.pair AND x.seed = y.seed AND y.arm = 'opd' AND y.objective = x.objective
        JOIN times tx ON tx.run = x.run JOIN times ty ON ty.run = y.run
    GROUP BY ALL
), claims AS (
    SELECT 1 AS k, x AS sub, 'OPD (' || split_part(x, '.', 2) || ') lowers the held-out full KL (final - round 0; holds: >= 40 % lower and >= 3 s.e.)' AS claim,
           pair, metric, seeds, d AS value, se, d / y_mean AS relative, NULL::DOUBLE AS wall_ratio,
           -d / y_mean >= 0.4 AND -d >= 3 * se AS holds
    FROM diff WHERE metric = 'full KL' AND x LIKE 'opd.%' AND y = x || '@start'
    UNION ALL
    SELECT 2, x, 'OPD (' || split_part(x, '.', 2) || ') ends with the teacher NLL of the student''s samples below round 0''s (final - round 0; holds: < 0 by >= 2 s.e.)',
           pair, metric, seeds, d, se, d / y_mean, NULL, d < 0 AND -d >= 2 * se
    FROM diff WHERE metric = 'teacher NLL' AND x LIKE 'opd.%' AND y = x || '@start'
    UNION ALL
    SELECT 3, x, 'OPD (' || split_part(x, '.', 2) || ') lowers the held-out top-k KL (final - round 0; holds: >= 20 % lower and >= 3 s.e.)',
           pair, metric, seeds, d, se, d / y_mean, NULL, -d / y_mean >= 0.2 AND -d >= 3 * se
    FROM diff WHERE metric = 'top-k KL' AND x LIKE 'opd.%' AND y = x || '@start'
    UNION ALL
    SELECT 4, x, 'OPD (' || split_part(x, '.', 2) || ') ends below OPD (student-topk) in full KL (' || x || ' - opd.student-topk; holds: < 0 by >= 2 s.e.)',
           pair, metric, seeds, d, se, d / y_mean, NULL, -d >= 2 * se
    FROM diff WHERE metric = 'full KL' AND x LIKE 'opd.%' AND x NOT LIKE '%@start' AND y = 'opd.student-topk'
    UNION ALL
    SELECT 5, a.x, split_part(a.x, '.', 1) || ' (' || split_part(a.x, '.', 2) || ') reaches OPD''s final ' || a.metric || ' (' || a.x || ' - ' || a.y || '; holds: <= 2 s.e. above, wall <= 0.6x OPD)',
           a.pair, a.metric, a.seeds, a.d, a.se, a.d / a.y_mean, w.wall_ratio, a.d <= 2 * a.se AND w.wall_ratio <= 0.6
    FROM diff a LEFT JOIN wall w ON w.pair = a.pair AND w.label = a.x
    WHERE a.metric IN ('full KL', 'top-k KL') AND a.x NOT LIKE 'opd.%' AND a.x NOT LIKE '%@start'
          AND a.y = 'opd.' || split_part(a.x, '.', 2)
    UNION ALL
    SELECT 6, y, 'The teacher answers more of the probe set than the round-0 student (teacher - round 0, two fixed checkpoints: the prompts are the replicates; holds: > 0 and >= 3 s.e.)',
           pair, metric, 1, d, sqrt(v), d / y_mean, NULL, d > 0 AND d >= 3 * sqrt(v)
    FROM seed_diff WHERE metric = 'accuracy' AND x = 'teacher' AND y LIKE '%@start'
    QUALIFY row_number() OVER (PARTITION BY pair ORDER BY seed, y) = 1  -- round 0: one checkpoint in every run
    UNION ALL
    SELECT 7, a.x, split_part(a.x, '.', 1) || ' (' || split_part(a.x, '.', 2) || ') closes >= 50 % of the teacher-student accuracy gap (final - round 0; relative: share of the gap; holds: >= 50 % and >= 3 s.e.)',
           a.pair, a.metric, a.seeds, a.d, a.se, CASE WHEN g.d > 0 THEN a.d / g.d END, w.wall_ratio,
           g.d > 0 AND a.d >= 0.5 * g.d AND a.d >= 3 * a.se
    FROM diff a JOIN diff g ON g.pair = a.pair AND g.metric = 'accuracy' AND g.x = 'teacher' AND g.y = a.x || '@start'
        LEFT JOIN wall w ON w.pair = a.pair AND w.label = a.x
    WHERE a.metric = 'accuracy' AND a.y = a.x || '@start'
    UNION ALL
    SELECT 8, a.x, split_part(a.x, '.', 1) || ' (' || split_part(a.x, '.', 2) || ') reaches OPD''s final accuracy (' || a.x || ' - ' || a.y || '; holds: >= -2 s.e., wall <= 0.6x OPD)',
           a.pair, a.metric, a.seeds, a.d, a.se, a.d / nullif(a.y_mean, 0), w.wall_ratio,
           a.d >= -2 * a.se AND w.wall_ratio <= 0.6
    FROM diff a LEFT JOIN wall w ON w.pair = a.pair AND w.label = a.x
    WHERE a.metric = 'accuracy' AND a.x NOT LIKE 'opd.%' AND a.x NOT LIKE '%@start' AND a.x <> 'teacher'
          AND a.y = 'opd.' || split_part(a.x, '.', 2)
    UNION ALL  -- issue 40: Prune-OPD against the cheaper answers to "late positions learn little"
    SELECT 9, a.x || ' ' || a.y, split_part(a.x, '.', 1) || ' (' || split_part(a.x, '.', 2) || ') beats ' || split_part(a.y, '.', 1) || ' in final accuracy (' || a.x || ' - ' || a.y || '; holds: > 0 by >= 2 s.e.)',
           a.pair, a.metric, a.seeds, a.d, a.se, a.d / nullif(a.y_mean, 0), NULL, a.d > 0 AND a.d >= 2 * a.se
    FROM diff a
    WHERE a.metric = 'accuracy' AND split_part(a.x, '.', 1) IN ('prune', 'prune-cal')
          AND split_part(a.y, '.', 1) IN ('truncate', 'random', 'iw-opd')
          AND split_part(a.x, '.', 2) = split_part(a.y, '.', 2)
          AND a.x NOT LIKE '%@start' AND a.y NOT LIKE '%@start'
)
SELECT claim, pair, seeds, value, se, relative, wall_ratio,
       CASE WHEN seeds >= 3 OR k = 6 THEN holds END AS holds, seeds < 3 AND k <> 6 AS needs_seeds
FROM claims
ORDER BY pair, k, sub, metric;
