-- Teacher positions computed per position kept, per round: the response positions the teacher's
-- forward scored (teacher stage lines, and in-flight rollouts, which score as they generate:
-- stage_times.teacher_positions) over the response positions stored in the cache. 1 when every
-- position goes through the teacher once; above 1 when positions past an in-flight stop were scored.
-- NULL for stage lines written before the field existed.
--   opdcache query RUN --file analysis/teacher_positions_per_kept.sql
WITH scored AS (
    SELECT round, sum(teacher_positions) AS teacher_positions FROM stage_walls
    WHERE run = 'main' AND stage IN ('rollout', 'teacher') GROUP BY round
), kept AS (
    SELECT round, sum(response_len) AS kept FROM rollouts GROUP BY round
)
SELECT k.round, s.teacher_positions, k.kept, s.teacher_positions / k.kept AS teacher_per_kept
FROM kept k LEFT JOIN scored s USING (round)
ORDER BY k.round;
