-- sluice's tables. Runs on ClickHouse 18.16 and current releases: DateTime plus a
-- milliseconds column instead of DateTime64, JSON kept in String columns, no TTL, no codecs.

CREATE TABLE IF NOT EXISTS events
(
    key             String,
    id              String,
    source          String,
    type            String,
    subject         String,
    specversion     String,
    datacontenttype String,
    dataschema      String,
    event_time      DateTime,
    event_time_ms   UInt16,
    received_at     DateTime,
    received_at_ms  UInt16,
    data            String,
    extensions      String,
    nats_subject    String,
    geo_country     String,
    geo_asn         UInt32,
    geo_as_org      String,
    ua_browser      String,
    ua_os           String,
    ua_device       String,
    enrichment      String,
    stream_seq      UInt64,
    inserted_at     DateTime DEFAULT now()
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (type, event_time, key);

CREATE TABLE IF NOT EXISTS dead_letters
(
    stage          String,
    reason         String,
    nats_subject   String,
    headers        String,
    payload        String,
    received_at    DateTime,
    received_at_ms UInt16,
    source_stream  String,
    source_seq     UInt64,
    stream_seq     UInt64,
    inserted_at    DateTime DEFAULT now()
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(received_at)
ORDER BY (stage, received_at, stream_seq);

CREATE TABLE IF NOT EXISTS alerts
(
    fingerprint String,
    rule        String,
    status      String,
    severity    String,
    labels      String,
    annotations String,
    starts_at   DateTime,
    starts_at_ms UInt16,
    event_key   String,
    replay      UInt8,
    stream_seq  UInt64,
    inserted_at DateTime DEFAULT now()
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(starts_at)
ORDER BY (rule, starts_at, fingerprint);
