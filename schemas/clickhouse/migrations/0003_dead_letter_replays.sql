-- Each replay of a dead letter (`sluice dlq replay`): which one (its DLQ sequence,
-- stream_seq in dead_letters), when, and where it went (the stream and sequence
-- JetStream stored it at; duplicate = 1 when the stream's duplicate window dropped it
-- as a replay already made). What became of it is found by that position: a row in
-- events, or a new dead letter whose source_seq it is.
CREATE TABLE IF NOT EXISTS dead_letter_replays
(
    dlq_seq       UInt64,
    replayed_at   DateTime,
    nats_subject  String,
    target_stream String,
    target_seq    UInt64,
    duplicate     UInt8
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(replayed_at)
ORDER BY (dlq_seq, replayed_at);
