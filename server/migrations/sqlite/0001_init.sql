-- Lowtide server schema, SQLite dialect. Keep in step with ../postgres/0001_init.sql:
-- the two differ only in the binary column type (BLOB here, BYTEA there).
-- Times are unix milliseconds (BIGINT); flags are BIGINT 0/1 so both backends decode them alike.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE content (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    size BIGINT NOT NULL,
    block_chunks_log BIGINT NOT NULL,
    origins TEXT NOT NULL,
    stored BIGINT NOT NULL,
    manifest TEXT NOT NULL,
    signature TEXT NOT NULL,
    published_ms BIGINT NOT NULL,
    retired_ms BIGINT
);

CREATE TABLE content_tables (
    content_id TEXT PRIMARY KEY REFERENCES content (id),
    data BLOB NOT NULL
);

CREATE TABLE enrol_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    note TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    uses_left BIGINT NOT NULL,
    revoked_ms BIGINT
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    hostname TEXT NOT NULL,
    token_id TEXT NOT NULL,
    enrolled_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    last_seen_ms BIGINT NOT NULL,
    site_id TEXT,
    site_override TEXT,
    addresses TEXT NOT NULL,
    subnets TEXT NOT NULL,
    port BIGINT NOT NULL,
    disk_free_bytes BIGINT NOT NULL,
    disk_usable_bytes BIGINT NOT NULL,
    chassis TEXT NOT NULL,
    os_type TEXT NOT NULL,
    uptime_secs BIGINT NOT NULL,
    preferred BIGINT NOT NULL
);
CREATE INDEX agents_site_seen ON agents (site_id, last_seen_ms);

CREATE TABLE holdings (
    content_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    complete BIGINT NOT NULL,
    ranges TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (content_id, agent_id)
);
CREATE INDEX holdings_agent ON holdings (agent_id);

CREATE TABLE sites (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    parent TEXT,
    kind TEXT NOT NULL,
    wan_up_kbps BIGINT,
    wan_down_kbps BIGINT,
    position BIGINT NOT NULL
);

CREATE TABLE subnets (
    cidr TEXT PRIMARY KEY,
    site_id TEXT NOT NULL REFERENCES sites (id)
);

CREATE TABLE rvp (
    site_id TEXT NOT NULL,
    content_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    elected_ms BIGINT NOT NULL,
    PRIMARY KEY (site_id, content_id)
);

CREATE TABLE traffic (
    site_id TEXT NOT NULL,
    link TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (site_id, link)
);
