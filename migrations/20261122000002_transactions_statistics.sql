-- Keep the planner's statistics of `transactions` close to the table's real size while it grows fast (a new
-- deployment): the default (analyse after 10% of the rows changed) left plans made for an empty table in use
-- for minutes, at a fraction of the throughput. Cheap: ANALYZE samples a fixed number of rows.
ALTER TABLE transactions SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000);
ALTER TABLE accounts SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000);
