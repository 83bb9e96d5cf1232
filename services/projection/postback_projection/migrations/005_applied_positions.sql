-- How far each group has applied each partition, written in the transaction of the rows it
-- wrote: a rebuild replays at least this far before its tables replace these, so nothing the
-- live tables hold goes missing, though a broker report its end offsets a batch behind.
CREATE TABLE applied_positions (
    consumer    text   NOT NULL,
    topic       text   NOT NULL,
    partition   int    NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);
