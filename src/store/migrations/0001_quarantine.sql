-- Quarantine entries shared by a cluster (issue 14). One row per held message; the
-- bytes in quarantine_messages (bytea: messages are bounded by [limits], far below
-- PostgreSQL's 1 GB per value, and a bytea row goes with its entry on DELETE, where a
-- large object would have to be unlinked separately and could leak).
CREATE TABLE quarantine_entries (
    id               text PRIMARY KEY,
    received_at      bigint NOT NULL,
    state            text NOT NULL CHECK (state IN ('held', 'releasing', 'released')),
    -- who changed the state last, and when (an audit of cluster-wide releases)
    state_at         bigint NOT NULL,
    state_by         text NOT NULL,
    instance         text NOT NULL,
    mail_from        text NOT NULL,
    header_from      text NOT NULL,
    rcpts            text NOT NULL,
    subject          text NOT NULL,
    reasons          text NOT NULL,
    flags            text NOT NULL,
    size             bigint NOT NULL,
    sender_domain    text NOT NULL,
    -- spreads the capacity counters over 16 rows, so concurrent writers rarely wait
    -- for the same counter row's lock until their commit
    usage_slot       smallint NOT NULL CHECK (usage_slot BETWEEN 0 AND 15),
    meta             jsonb NOT NULL
);

CREATE TABLE quarantine_messages (
    id     text PRIMARY KEY REFERENCES quarantine_entries (id) ON DELETE CASCADE,
    bytes  bytea NOT NULL
);

-- `list` (newest first, keyset pagination on (received_at, id)): the default view
-- shows pending entries only, served by the partial index; `--all` by the full one,
-- which purge (received_at < cutoff) also uses.
CREATE INDEX quarantine_entries_order ON quarantine_entries (received_at DESC, id DESC);
CREATE INDEX quarantine_entries_pending ON quarantine_entries (received_at DESC, id DESC)
    WHERE state IN ('held', 'releasing');

-- Capacity and per-state counts kept by a trigger in the same transaction as each
-- insert, delete and state change, by any instance: reading them is a few point reads
-- however large the store (the same design as the embedded index's SQLite triggers).
CREATE TABLE quarantine_counts (
    state    text NOT NULL,
    slot     smallint NOT NULL,
    entries  bigint NOT NULL DEFAULT 0,
    bytes    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (state, slot)
);
INSERT INTO quarantine_counts (state, slot)
    SELECT s, n FROM unnest(ARRAY['held', 'releasing', 'released']) AS s,
                     generate_series(0, 15) AS n;

CREATE TABLE quarantine_domain_usage (
    domain   text NOT NULL,
    slot     smallint NOT NULL,
    entries  bigint NOT NULL,
    bytes    bigint NOT NULL,
    PRIMARY KEY (domain, slot)
);

CREATE FUNCTION quarantine_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE quarantine_counts SET entries = entries - 1, bytes = bytes - OLD.size
            WHERE state = OLD.state AND slot = OLD.usage_slot;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE quarantine_counts SET entries = entries + 1, bytes = bytes + NEW.size
            WHERE state = NEW.state AND slot = NEW.usage_slot;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO quarantine_domain_usage (domain, slot, entries, bytes)
            VALUES (NEW.sender_domain, NEW.usage_slot, 1, NEW.size)
            ON CONFLICT (domain, slot) DO UPDATE
            SET entries = quarantine_domain_usage.entries + 1,
                bytes = quarantine_domain_usage.bytes + EXCLUDED.bytes;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE quarantine_domain_usage SET entries = entries - 1, bytes = bytes - OLD.size
            WHERE domain = OLD.sender_domain AND slot = OLD.usage_slot;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER quarantine_entries_count
    AFTER INSERT OR DELETE OR UPDATE OF state ON quarantine_entries
    FOR EACH ROW EXECUTE FUNCTION quarantine_count();
