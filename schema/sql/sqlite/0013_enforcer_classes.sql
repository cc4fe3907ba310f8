-- The HTB class statistics each enforcer reported last, beside its
-- decisions' nftables counters (`enforcer_counters`, migration 0009): one
-- row per class of its tree, replaced whole by every accounting report;
-- how many classes it left out (over the per-report bound) on the
-- enforcer's row.
CREATE TABLE IF NOT EXISTS enforcer_classes (
    enforcer      TEXT    NOT NULL,
    classid       TEXT    NOT NULL,
    parent        TEXT    NOT NULL,
    bytes         BIGINT  NOT NULL,
    packets       BIGINT  NOT NULL,
    drops         BIGINT  NOT NULL,
    overlimits    BIGINT  NOT NULL,
    backlog_bytes BIGINT  NOT NULL,
    PRIMARY KEY (enforcer, classid)
);

ALTER TABLE enforcers ADD COLUMN classes_omitted BIGINT;
