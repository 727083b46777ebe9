-- Whether the agent serves peers now (its heartbeat's `serves`; 1 for agents whose heartbeat
-- does not say, i.e. older agents). 0: uploads_max = 0, on battery with serve_on_battery = false,
-- busy, or anything else that makes its engine refuse every session. Elections take an agent
-- that does not serve only when no agent of the site does.
ALTER TABLE agents ADD COLUMN serves BIGINT NOT NULL DEFAULT 1;
