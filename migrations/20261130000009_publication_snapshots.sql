-- Publication by snapshot pairs (as PgQ does). The publisher takes a snapshot of the whole
-- cluster (`pg_current_snapshot()`), publishes every event whose transaction is visible in it
-- and was not visible in the previous one, then moves on. A transaction that stays open —
-- ours or another database's — delays only its own events, never everyone else's.
--   snapshot:  every event visible in it has been published;
--   pending:   the snapshot being published now (NULL between rounds);
--   commit_xid, global_position: how far into `pending` publication has got, in commit order.
ALTER TABLE publisher_checkpoints
    ADD COLUMN snapshot pg_snapshot NOT NULL DEFAULT '1:1:',
    ADD COLUMN pending  pg_snapshot;

-- The old checkpoint meant: every event of a transaction below `commit_xid` is out (the old
-- reader only read below the oldest running transaction), and those of `commit_xid` itself up
-- to `global_position`.
UPDATE publisher_checkpoints
   SET snapshot = (commit_xid || ':' || commit_xid || ':')::pg_snapshot,
       pending  = ((commit_xid + 1) || ':' || (commit_xid + 1) || ':')::pg_snapshot
 WHERE commit_xid > 0;
