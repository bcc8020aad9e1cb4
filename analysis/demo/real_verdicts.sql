-- The real-pair demo's claims (issue 23), computed from OUT/runs/<pair>-<arm>-s<seed>/ of
-- `opdcache demo --real`: eval results with the distillation metrics, stage times.
--   duckdb -c "SET VARIABLE runs = 'demo-real/runs'; .read analysis/demo/real_verdicts.sql"
-- Two metrics, each per prompt on the student's own samples of the held-out probe set: the top-k
-- reverse KL to the teacher (eval per_prompt_kl, the issue's metric), and the full-vocabulary reverse
-- KL at the same prefixes (per_prompt_full_kl), which also sees probability the student moved
-- outside its top-k, where the top-k KL (and the OPD loss) cannot look. Every arm of a pair evaluates the same probe prompts,
-- so a difference is taken prompt by prompt (paired): per seed, the mean of the per-prompt
-- differences with s.e. = their s.d. / sqrt(prompts); over seeds, the mean with
-- s.e. = sqrt(sum of the seeds' squared s.e.) / seeds. Wall time is every stage but evaluation (an
-- engine start made by evaluation counts), as in verdicts.sql.
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
           regexp_extract(filename, 'round=([0-9]+)', 1)::INTEGER AS round, per_prompt_kl,
           per_prompt_full_kl
    FROM read_json(getvariable('runs') || '/*/eval/round=*.json', filename = true,
                   columns = {topk_kl: 'DOUBLE', per_prompt_kl: 'JSON', per_prompt_full_kl: 'JSON'})
    WHERE topk_kl IS NOT NULL
), labelled AS (  -- each run's last evaluation under its arm, its first under <arm>@start
    SELECT i.pair, i.seed, CASE WHEN e.round = b.last THEN i.arm ELSE i.arm || '@start' END AS label,
           m.metric, j.key AS prompt, j.value::DOUBLE AS kl
    FROM ids i JOIN evals e ON e.run = i.run
        JOIN (SELECT run, min(round) AS first, max(round) AS last FROM evals GROUP BY run) b
            ON b.run = e.run AND e.round IN (b.first, b.last) AND b.first < b.last,
         (VALUES ('top-k KL'), ('full KL')) m(metric),
         json_each(CASE m.metric WHEN 'top-k KL' THEN e.per_prompt_kl ELSE e.per_prompt_full_kl END) j
), seed_diff AS (  -- evaluation x minus evaluation y, one seed, prompt by prompt
    SELECT x.pair, x.metric, x.label AS x, y.label AS y, x.seed, avg(x.kl - y.kl) AS d,
           var_samp(x.kl - y.kl) / count(*) AS v, avg(y.kl) AS y_mean
    FROM labelled x JOIN labelled y
        ON x.pair = y.pair AND x.metric = y.metric AND x.seed = y.seed AND x.label <> y.label
           AND x.prompt = y.prompt
    GROUP BY ALL
), kl_diff AS (
    SELECT pair, metric, x, y, count(*) AS seeds, avg(d) AS d, sqrt(sum(v)) / count(*) AS se, avg(y_mean) AS y_mean
    FROM seed_diff GROUP BY ALL
), times AS (
    SELECT regexp_extract(filename, '([^/]+)/stage_times\.jsonl$', 1) AS run,
           sum(CASE WHEN stage = 'eval' THEN seconds - coalesce(work_seconds, seconds) ELSE seconds END) AS wall
    FROM read_json(getvariable('runs') || '/*/stage_times.jsonl', format = 'newline_delimited',
                   filename = true, ignore_errors = true,
                   columns = {run: 'VARCHAR', stage: 'VARCHAR', seconds: 'DOUBLE', work_seconds: 'DOUBLE'})
    WHERE run = 'main' GROUP BY ALL
), wall AS (  -- arm x's wall over OPD's, averaged over the seeds both ran
    SELECT x.pair, x.arm, avg(tx.wall / ty.wall) AS wall_ratio
    FROM ids x JOIN ids y ON x.pair = y.pair AND x.seed = y.seed AND y.arm = 'opd'
        JOIN times tx ON tx.run = x.run JOIN times ty ON ty.run = y.run
    GROUP BY ALL
), claims AS (
    SELECT 1 AS k, 'OPD lowers the held-out ' || metric || ' (final - round 0; holds: >= 20 % lower and >= 3 s.e.)' AS claim,
           pair, metric, seeds, d AS value, se, -d / y_mean AS relative, NULL::DOUBLE AS wall_ratio,
           -d / y_mean >= 0.2 AND -d >= 3 * se AS holds
    FROM kl_diff WHERE x = 'opd' AND y = 'opd@start'
    UNION ALL
    SELECT CASE a.x WHEN 'prune' THEN 2 WHEN 'prune-cal' THEN 3 ELSE 4 END,
           a.x || ' reaches OPD''s final ' || a.metric || ' (' || a.x || ' - opd; holds: <= 2 s.e. above, wall <= 0.6x OPD)',
           a.pair, a.metric, a.seeds, a.d, a.se, a.d / a.y_mean, w.wall_ratio, a.d <= 2 * a.se AND w.wall_ratio <= 0.6
    FROM kl_diff a LEFT JOIN wall w ON w.pair = a.pair AND w.arm = a.x
    WHERE a.y = 'opd' AND a.x IN ('prune', 'prune-cal', 'truncate')
)
SELECT claim, pair, seeds, value, se, relative, wall_ratio, holds FROM claims
ORDER BY pair, metric DESC, k;
