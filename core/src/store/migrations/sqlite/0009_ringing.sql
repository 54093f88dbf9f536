-- Who is being rung for a queued call (issue 16), as the node that rings them reports it:
-- since when (unix ms of the database clock) and for which queue; NULL when not ringing.
-- For supervisors only: routing keeps a ringing agent from a second ring by the lease in
-- the lock service, so `state` (and its CHECK) is left alone and a ring does not move the
-- directory version. The control planes read the ringing agents about twice a second,
-- hence the index.
ALTER TABLE agents ADD COLUMN ringing_since_ms INTEGER NULL;
ALTER TABLE agents ADD COLUMN ringing_queue TEXT NULL;
CREATE INDEX IF NOT EXISTS agents_ringing ON agents (ringing_since_ms);
