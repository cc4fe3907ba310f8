-- DPMI (issue 15, seeds/003 §2.3-5): measurement points, users' measurement
-- requests, the filter list the controller merged for each point, and what
-- each point delivered to each consumer. Filters are the JSON objects of
-- qosloop_schema::dpmi::Filter; booleans are 0/1 integers in both dialects.

-- A measurement point (a meter run with --dpmi-point), as it registered
-- and last reported.
CREATE TABLE IF NOT EXISTS dpmi_points (
    name              TEXT    PRIMARY KEY,
    interface         TEXT    NOT NULL,
    max_filters       BIGINT  NOT NULL,
    max_caplen        BIGINT  NOT NULL,
    registered_ns     BIGINT  NOT NULL,
    seen_ns           BIGINT  NOT NULL,
    installed_version TEXT,
    install_error     TEXT,
    -- As the point last reported: frames it read, frames a filter
    -- matched, frames the kernel dropped (its ring was full).
    frames            BIGINT  NOT NULL DEFAULT 0,
    matched           BIGINT  NOT NULL DEFAULT 0,
    kernel_drops      BIGINT  NOT NULL DEFAULT 0
);

-- A user's request: which frames (filter), where (points, a JSON list),
-- when ([start_ns, stop_ns)), to whom (consumer HOST:PORT) and how.
-- ended_ns is set when its owner ends it early.
CREATE TABLE IF NOT EXISTS dpmi_requests (
    id          INTEGER PRIMARY KEY,
    owner       TEXT    NOT NULL,
    points      TEXT    NOT NULL,
    filter      TEXT    NOT NULL,
    consumer    TEXT    NOT NULL,
    delivery    TEXT    NOT NULL,
    caplen       BIGINT NOT NULL,
    anonymise    BIGINT NOT NULL,
    start_ns    BIGINT  NOT NULL,
    stop_ns     BIGINT  NOT NULL,
    created_ns  BIGINT  NOT NULL,
    ended_ns    BIGINT
);
CREATE INDEX IF NOT EXISTS dpmi_requests_stop ON dpmi_requests (stop_ns);

-- The ordered filter list a point runs (position 0 first); consumers and
-- requests are JSON lists; widened = 1 when wider than a request it serves.
CREATE TABLE IF NOT EXISTS dpmi_filters (
    point        TEXT    NOT NULL,
    position      BIGINT NOT NULL,
    version      TEXT    NOT NULL,
    filter       TEXT    NOT NULL,
    consumers    TEXT    NOT NULL,
    requests     TEXT    NOT NULL,
    widened       BIGINT NOT NULL,
    computed_ns  BIGINT  NOT NULL,
    PRIMARY KEY (point, position)
);

-- What a point delivered to a consumer, as it last reported; drops by
-- reason: the consumer's bounded buffer was full, or it was not connected.
CREATE TABLE IF NOT EXISTS dpmi_deliveries (
    point                TEXT    NOT NULL,
    consumer             TEXT    NOT NULL,
    delivered            BIGINT  NOT NULL,
    bytes                BIGINT  NOT NULL,
    dropped_full         BIGINT  NOT NULL,
    dropped_disconnected BIGINT  NOT NULL,
    connected             BIGINT NOT NULL,
    error                TEXT,
    updated_ns           BIGINT  NOT NULL,
    PRIMARY KEY (point, consumer)
);
