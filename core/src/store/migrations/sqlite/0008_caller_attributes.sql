-- Caller attributes kept in the control plane (issue 16): a caller number, normalised to
-- digits with an optional leading `+`, and the attributes its calls carry (`vip`), which
-- routing matches against agents' tags. A number without attributes has no row. Read one
-- number at a time by the node-agents (by primary key), paged by number for a listing.
CREATE TABLE IF NOT EXISTS caller_attributes (
    number     TEXT NOT NULL PRIMARY KEY,
    -- JSON array of short lowercase words, sorted, without duplicates, never empty.
    attributes TEXT NOT NULL
);
