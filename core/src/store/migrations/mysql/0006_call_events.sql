-- What the node-agents write about queued calls (issue 16): rings an agent did not answer,
-- per day beside calls and sales, and how many in a row, which pauses the agent at the
-- queue's `max_misses`. An answered call resets the row.
ALTER TABLE daily_counters ADD COLUMN missed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN misses_in_row INT NOT NULL DEFAULT 0;

-- The answer given to a remembered request when it is more than one count (a call event
-- answers a state or several counts), as a JSON object; NULL for the sales of 0005, whose
-- answer is `result`.
ALTER TABLE request_ids ADD COLUMN answer TEXT NULL;
