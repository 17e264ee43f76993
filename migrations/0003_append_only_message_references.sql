-- Messages name parties, a channel and a conversation that many messages
-- share (every message of a busy number names the same party row). A
-- foreign key check takes a KEY SHARE lock on the referenced row for every
-- message inserted, so concurrent batches queue on, and share-lock through
-- multixacts, the same few rows: with these four checks normalized ingestion
-- stored ~40% fewer messages per second (pgbench, batches of 23, two
-- clients). ingest_webhook_batch resolves those ids in the same call that
-- inserts the message, and Hermes never deletes or re-keys such rows, so the
-- guarantee the keys gave (no message names a missing row) is kept instead
-- by making the referenced tables append-only: deleting, truncating or
-- changing the id of their rows is refused, which costs nothing per insert.
-- messages.event_id keeps its foreign key (its event is not shared), and so
-- do conversations (inserted once per pair of parties).

ALTER TABLE messages
    DROP CONSTRAINT messages_conversation_id_fkey,
    DROP CONSTRAINT messages_channel_id_fkey,
    DROP CONSTRAINT messages_sender_id_fkey,
    DROP CONSTRAINT messages_recipient_id_fkey;

CREATE FUNCTION refuse_removing_message_references() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are referenced by messages: they cannot be deleted, truncated or re-keyed',
        TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER parties_append_only
    BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON parties
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_removing_message_references();

CREATE TRIGGER channels_append_only
    BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_removing_message_references();

CREATE TRIGGER conversations_append_only
    BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON conversations
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_removing_message_references();
