-- The kernel counters each enforcer reported last (COPS RPT with
-- Report-Type Accounting, docs/decisions.md): one row per decision it
-- holds, replaced whole by every report; the report's time and how many
-- decisions it left out (over the per-report bound) on the enforcer's row.
CREATE TABLE IF NOT EXISTS enforcer_counters (
    enforcer               TEXT    NOT NULL,
    decision_id            BIGINT  NOT NULL,
    version                BIGINT  NOT NULL,
    kind                   TEXT    NOT NULL CHECK (kind IN ('accept', 'remark', 'drop')),
    in_profile_packets     BIGINT  NOT NULL,
    in_profile_bytes       BIGINT  NOT NULL,
    out_of_profile_packets BIGINT  NOT NULL,
    out_of_profile_bytes   BIGINT  NOT NULL,
    PRIMARY KEY (enforcer, decision_id)
);

ALTER TABLE enforcers ADD COLUMN counters_at_ns BIGINT;
ALTER TABLE enforcers ADD COLUMN counters_omitted BIGINT;
