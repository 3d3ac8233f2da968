-- backlog: the ledger's backlog, for the health check: how many outboxes hold records whose
-- ledger rows are not written yet, and since when the oldest of them waits.
-- KEYS[1] backlog registry (see _window.lua). ARGV[1] now ms override or "".
-- Returns {outboxes waiting, ms since the oldest record waits (-1: none), now ms}.
local now = clock(ARGV[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local since = -1
if #oldest > 0 then since = tonumber(oldest[2]) end
return {redis.call('ZCARD', KEYS[1]), since, now}
