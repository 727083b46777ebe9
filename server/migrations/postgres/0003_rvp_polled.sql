-- When the RVP last asked for its assignments (POST /v1/assignments, long-polled by every
-- agent). NULL: not since it was elected (elected_ms counts). An RVP that stops polling is
-- replaced long before its heartbeats would make it inactive.
ALTER TABLE rvp ADD COLUMN polled_ms BIGINT;
CREATE INDEX rvp_agent ON rvp (agent_id);
