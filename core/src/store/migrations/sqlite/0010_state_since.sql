-- Since when an agent is in their state (unix ms of the database clock), for supervisors'
-- "time in state". Rows from before this column start from when the agent last became
-- available: the best figure there is, exact for available agents.
ALTER TABLE agents ADD COLUMN state_since_ms INTEGER NOT NULL DEFAULT 0;
UPDATE agents SET state_since_ms = idle_since_ms;
