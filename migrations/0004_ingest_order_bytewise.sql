-- ingest_webhook_batch inserts a batch's events in key order so that
-- concurrent batches lock them in one order and do not deadlock. The host's
-- optimistic COPY of raw events inserts them sorted bytewise (Rust's string
-- order), while 0002 sorted by the database's collation: on a database whose
-- default collation is not C, the two orders differ (en_US puts "a-2" after
-- "a1"), and a COPY and a call storing the same keys at once could deadlock
-- (Postgres breaks it after deadlock_timeout and the host retries, a second
-- lost). The same function, with its events in bytewise order; every other
-- step locks rows that only this function inserts, in one order already.

CREATE OR REPLACE FUNCTION ingest_webhook_batch(
    sources                  text[],
    keys                     text[],
    bodies                   text[],
    received                 timestamptz[],
    provider                 text[],
    channel                  text[],
    from_kind                text[],
    from_address             text[],
    to_kind                  text[],
    to_address               text[],
    msg_body                 text[],
    msg_sent_at              timestamptz[],
    msg_provider_message_id  text[],
    att_index                int[],
    att_position             int[],
    att_url                  text[]
) RETURNS TABLE (idx int, id bigint, inserted boolean)
LANGUAGE plpgsql
VOLATILE
AS $$
#variable_conflict error
DECLARE
    n            int := coalesce(cardinality(sources), 0);
    new_idx      int[];
    new_id       bigint[];
    dup_idx      int[];
    dup_id       bigint[];
    -- The newly inserted events that carry a message, and their ids.
    msg_idx      int[];
    msg_event    bigint[];
    stored_msgs  bigint;
    stored_atts  bigint;
    expect_atts  bigint;
BEGIN
    IF coalesce(cardinality(keys), 0) <> n
       OR coalesce(cardinality(bodies), 0) <> n
       OR coalesce(cardinality(received), 0) <> n
       OR coalesce(cardinality(provider), 0) <> n
       OR coalesce(cardinality(channel), 0) <> n
       OR coalesce(cardinality(from_kind), 0) <> n
       OR coalesce(cardinality(from_address), 0) <> n
       OR coalesce(cardinality(to_kind), 0) <> n
       OR coalesce(cardinality(to_address), 0) <> n
       OR coalesce(cardinality(msg_body), 0) <> n
       OR coalesce(cardinality(msg_sent_at), 0) <> n
       OR coalesce(cardinality(msg_provider_message_id), 0) <> n
       OR coalesce(cardinality(att_position), 0) <> coalesce(cardinality(att_index), 0)
       OR coalesce(cardinality(att_url), 0) <> coalesce(cardinality(att_index), 0) THEN
        RAISE EXCEPTION 'ingest_webhook_batch: argument arrays of different lengths'
            USING ERRCODE = 'XX000';
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;

    -- 1. The raw events; a redelivered key is left alone.
    WITH ins AS (
        INSERT INTO webhook_events (source, idempotency_key, body, received_at)
        SELECT t.source, t.idempotency_key, t.body::jsonb, t.received_at
        FROM unnest(sources, keys, bodies, received)
             AS t(source, idempotency_key, body, received_at)
        ORDER BY t.source COLLATE "C", t.idempotency_key COLLATE "C"
        ON CONFLICT (source, idempotency_key) DO NOTHING
        RETURNING webhook_events.id AS event_id, webhook_events.source AS source,
                  webhook_events.idempotency_key AS idempotency_key
    )
    SELECT coalesce(array_agg(u.i), '{}'), coalesce(array_agg(ins.event_id), '{}')
    INTO new_idx, new_id
    FROM ins
    JOIN unnest(sources, keys) WITH ORDINALITY AS u(source, idempotency_key, i)
      ON u.source = ins.source AND u.idempotency_key = ins.idempotency_key;

    -- 2. The ids of the others, already stored (possibly by a concurrent
    --    batch that committed while step 1 waited for it: a new snapshot).
    IF cardinality(new_idx) < n THEN
        SELECT coalesce(array_agg(u.i), '{}'), coalesce(array_agg(e.id), '{}')
        INTO dup_idx, dup_id
        FROM unnest(sources, keys) WITH ORDINALITY AS u(source, idempotency_key, i)
        JOIN webhook_events e
          ON e.source = u.source AND e.idempotency_key = u.idempotency_key
        WHERE NOT (u.i = ANY (new_idx));
    ELSE
        dup_idx := '{}';
        dup_id := '{}';
    END IF;
    IF cardinality(new_idx) + cardinality(dup_idx) <> n THEN
        RAISE EXCEPTION 'ingest_webhook_batch: % of % events were neither inserted nor found',
            n - cardinality(new_idx) - cardinality(dup_idx), n
            USING ERRCODE = 'XX000';
    END IF;

    -- 3. The messages of the newly inserted events.
    SELECT coalesce(array_agg(m.i), '{}'), coalesce(array_agg(m.event_id), '{}')
    INTO msg_idx, msg_event
    FROM unnest(new_idx, new_id) AS m(i, event_id)
    WHERE provider[m.i] IS NOT NULL;

    IF cardinality(msg_idx) > 0 THEN
        INSERT INTO providers (name)
        SELECT DISTINCT provider[m.i]
        FROM unnest(msg_idx) AS m(i)
        ORDER BY 1
        ON CONFLICT (name) DO NOTHING;

        INSERT INTO channels (provider_id, kind)
        SELECT DISTINCT p.id, channel[m.i]
        FROM unnest(msg_idx) AS m(i)
        JOIN providers p ON p.name = provider[m.i]
        ORDER BY 1, 2
        ON CONFLICT (provider_id, kind) DO NOTHING;

        INSERT INTO parties (kind, address)
        SELECT DISTINCT t.kind, t.address
        FROM (
            SELECT from_kind[m.i], from_address[m.i] FROM unnest(msg_idx) AS m(i)
            UNION ALL
            SELECT to_kind[m.i], to_address[m.i] FROM unnest(msg_idx) AS m(i)
        ) AS t(kind, address)
        ORDER BY 1, 2
        ON CONFLICT (kind, address) DO NOTHING;

        INSERT INTO conversations (party_low, party_high)
        SELECT DISTINCT least(f.id, r.id), greatest(f.id, r.id)
        FROM unnest(msg_idx) AS m(i)
        JOIN parties f ON f.kind = from_kind[m.i] AND f.address = from_address[m.i]
        JOIN parties r ON r.kind = to_kind[m.i] AND r.address = to_address[m.i]
        ORDER BY 1, 2
        ON CONFLICT (party_low, party_high) DO NOTHING;

        WITH inserted_messages AS (
            INSERT INTO messages (event_id, conversation_id, channel_id, sender_id,
                                  recipient_id, body, sent_at, provider_message_id)
            SELECT m.event_id, c.id, ch.id, f.id, r.id,
                   msg_body[m.i], msg_sent_at[m.i], msg_provider_message_id[m.i]
            FROM unnest(msg_idx, msg_event) AS m(i, event_id)
            JOIN providers p ON p.name = provider[m.i]
            JOIN channels ch ON ch.provider_id = p.id AND ch.kind = channel[m.i]
            JOIN parties f ON f.kind = from_kind[m.i] AND f.address = from_address[m.i]
            JOIN parties r ON r.kind = to_kind[m.i] AND r.address = to_address[m.i]
            JOIN conversations c
              ON c.party_low = least(f.id, r.id) AND c.party_high = greatest(f.id, r.id)
            RETURNING messages.id AS message_id, messages.event_id AS event_id
        ), attached AS (
            INSERT INTO message_attachments (message_id, position, url)
            SELECT im.message_id, a.position, a.url
            FROM unnest(att_index, att_position, att_url) AS a(i, position, url)
            JOIN unnest(msg_idx, msg_event) AS m(i, event_id) ON m.i = a.i
            JOIN inserted_messages im ON im.event_id = m.event_id
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM inserted_messages), (SELECT count(*) FROM attached)
        INTO stored_msgs, stored_atts;

        SELECT count(*) INTO expect_atts
        FROM unnest(att_index) AS a(i)
        WHERE a.i = ANY (msg_idx);
        IF stored_msgs <> cardinality(msg_idx) OR stored_atts <> expect_atts THEN
            RAISE EXCEPTION 'ingest_webhook_batch: stored % of % messages and % of % attachments',
                stored_msgs, cardinality(msg_idx), stored_atts, expect_atts
                USING ERRCODE = 'XX000';
        END IF;
    END IF;

    RETURN QUERY
        SELECT r.i, r.event_id, r.is_new
        FROM (
            SELECT x.i, x.event_id, true AS is_new
            FROM unnest(new_idx, new_id) AS x(i, event_id)
            UNION ALL
            SELECT x.i, x.event_id, false
            FROM unnest(dup_idx, dup_id) AS x(i, event_id)
        ) AS r
        ORDER BY r.i;
END;
$$;
