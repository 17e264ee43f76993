-- Webhook ingestion: every accepted event as received, and what the
-- normalized ones (sms, email) resolve to: parties, provider and channel,
-- conversations, messages and their attachments.

-- One row per event, stored once per (source, idempotency key): a redelivery
-- finds the existing row.
CREATE TABLE webhook_events (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source           text        NOT NULL,
    idempotency_key  text        NOT NULL,
    body             jsonb       NOT NULL,
    received_at      timestamptz NOT NULL,
    stored_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_events_source_idempotency_key UNIQUE (source, idempotency_key)
);

-- Who delivered a message (by default, the webhook source's name).
CREATE TABLE providers (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name  text   NOT NULL,
    CONSTRAINT providers_name UNIQUE (name)
);

-- A provider's channel of one kind.
CREATE TABLE channels (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider_id  bigint NOT NULL REFERENCES providers (id),
    kind         text   NOT NULL CHECK (kind IN ('sms', 'email')),
    CONSTRAINT channels_provider_kind UNIQUE (provider_id, kind)
);

-- A phone number (E.164) or an email address (lower case), stored once.
CREATE TABLE parties (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('phone', 'email')),
    address     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT parties_kind_address UNIQUE (kind, address),
    CONSTRAINT parties_phone_is_e164 CHECK (kind <> 'phone' OR address ~ '^\+[1-9][0-9]{1,14}$'),
    CONSTRAINT parties_email_is_lower_case CHECK (kind <> 'email' OR address = lower(address))
);

-- One conversation per unordered pair of parties: the lower id first.
CREATE TABLE conversations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    party_low   bigint      NOT NULL REFERENCES parties (id),
    party_high  bigint      NOT NULL REFERENCES parties (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT conversations_pair UNIQUE (party_low, party_high),
    CONSTRAINT conversations_pair_is_ordered CHECK (party_low <= party_high)
);
CREATE INDEX conversations_party_high ON conversations (party_high);

-- A normalized message: one per event.
CREATE TABLE messages (
    id                   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id             bigint      NOT NULL REFERENCES webhook_events (id),
    conversation_id      bigint      NOT NULL REFERENCES conversations (id),
    channel_id           bigint      NOT NULL REFERENCES channels (id),
    sender_id            bigint      NOT NULL REFERENCES parties (id),
    recipient_id         bigint      NOT NULL REFERENCES parties (id),
    body                 text,
    sent_at              timestamptz NOT NULL,
    provider_message_id  text,
    CONSTRAINT messages_event UNIQUE (event_id)
);
CREATE INDEX messages_conversation_sent_at ON messages (conversation_id, sent_at);

-- A message's attachments, in the order the payload listed them.
CREATE TABLE message_attachments (
    message_id  bigint  NOT NULL REFERENCES messages (id),
    position    integer NOT NULL CHECK (position >= 0),
    url         text    NOT NULL,
    PRIMARY KEY (message_id, position)
);
