-- expire: move reservations whose deadline passed into the ledger outbox. They stay charged
-- at their estimate; their concurrency slot is released. The caller writes one ledger row per
-- outbox entry and then acknowledges it (ack.lua), so a crash in between loses nothing.
-- KEYS and ARGV[1..5]: see _window.lua. KEYS[6] the backlog registry, KEYS[7] the due
-- registry (see _window.lua). ARGV[6] most reservations to move.
-- Outbox record: "e:<moved at ms>:" then the reservation record (see parse_pending in
-- _window.lua); records written before the registries lack "e:<moved at ms>:". Returns how many overdue ids left the pending set (at
-- most ARGV[6]: the caller calls again while it gets that many).
local now = clock(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))
local moved = 0
for _, rid in ipairs(ids) do
  local rec = redis.call('HGET', KEYS[4], rid)
  redis.call('ZREM', KEYS[3], rid)
  if rec then
    redis.call('HDEL', KEYS[4], rid)
    redis.call('HSET', KEYS[5], rid, 'e:' .. now .. ':' .. rec)
    local estimate = parse_pending(rec).tokens
    if redis.call('HINCRBY', KEYS[1], 'rv', -estimate) < 0 then
      redis.call('HSET', KEYS[1], 'rv', 0)
    end
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('PEXPIRE', KEYS[5], OUTBOX_TTL_MS)
  note_backlog(KEYS[6], KEYS[5], now)
end
note_due(KEYS[7], KEYS[3])
return #ids
