-- Fencing of the pipeline's inserts (docs/exactly-once.md). Each owner of a
-- partition records its claim's generation (the NATS KV revision that acquired it)
-- in partition_fences before it writes. The pipeline inserts events into
-- events_fenced, a Null table whose materialized view events_fence passes on to
-- events only the rows of each partition's newest generation: an insert that a
-- worker sent before it lost the partition, and that reaches the server after the
-- next owner took over, stores nothing. The filter runs in the server, on
-- revisions, not on any clock.
--
-- The view also refuses (the insert fails, and the pipeline retries it) rows of a
-- month that `sluice replay` holds in events_holds while it swaps the month's rows
-- (ALTER TABLE ... REPLACE PARTITION): no live row is lost to the swap. A hold
-- lasts until its last row's `until` (the tool renews it), so a hold whose tool
-- died ends by itself.
--
-- A later migration that adds a column to events must not drop and recreate this
-- view (inserts between the two would store nothing) nor add a second view on
-- events_fenced (rows would be stored twice): it makes a new pair, events_fenced_2
-- and its view, and the pipeline's code moves to it; the old pair stays for
-- workers still running the old code (on 18.16 its view then needs the new column
-- in its target and refuses their inserts until they are upgraded).

CREATE TABLE IF NOT EXISTS partition_fences
(
    partition UInt32,
    gen       UInt64,
    worker    String,
    fenced_at DateTime DEFAULT now()
)
ENGINE = MergeTree()
ORDER BY (partition, gen);

CREATE TABLE IF NOT EXISTS events_holds
(
    month UInt32,
    hold  String,
    until DateTime,
    seq   UInt64
)
ENGINE = MergeTree()
ORDER BY (month, hold, seq);

CREATE TABLE IF NOT EXISTS events_fenced
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
    partition       UInt32,
    gen             UInt64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS events_fence TO events AS
SELECT key, id, source, type, subject, specversion, datacontenttype, dataschema,
       event_time, event_time_ms, received_at, received_at_ms, data, extensions,
       nats_subject, geo_country, geo_asn, geo_as_org, ua_browser, ua_os, ua_device,
       enrichment, stream_seq, now() AS inserted_at
FROM events_fenced
WHERE (partition, gen) IN (SELECT partition, max(gen) FROM partition_fences GROUP BY partition)
  AND toUInt8(if(toYYYYMM(event_time) IN (SELECT month FROM events_holds GROUP BY month, hold HAVING argMax(until, seq) > now()),
                 'events: this month is held while sluice replay swaps its rows; the insert is retried', '0')) = 0;
