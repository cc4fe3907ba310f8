-- Per-user subjects (issue 16, docs/cluster.md): the cluster's owners
-- compute a rate per user of each per-user rule, a subject of kind
-- `user` keyed by `qosloop_schema::bandwidth::user_subject` (the user,
-- `@`, the rule's DN), with partial sums, state and `rates` rows like
-- the rule and link subjects.

ALTER TABLE rates DROP CONSTRAINT IF EXISTS rates_subject_check;
ALTER TABLE rates ADD CONSTRAINT rates_subject_check
    CHECK (subject IN ('flow', 'link', 'user'));

ALTER TABLE rate_partials DROP CONSTRAINT IF EXISTS rate_partials_kind_check;
ALTER TABLE rate_partials ADD CONSTRAINT rate_partials_kind_check
    CHECK (kind IN ('flow', 'link', 'user'));

ALTER TABLE rate_state DROP CONSTRAINT IF EXISTS rate_state_kind_check;
ALTER TABLE rate_state ADD CONSTRAINT rate_state_kind_check
    CHECK (kind IN ('flow', 'link', 'user'));
