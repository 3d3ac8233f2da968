-- reset: give a user the whole budget back now (an admin action) in every counter of the
-- user's own layers. Keeps the epochs, so nothing is rebuilt from the ledger; in-flight
-- reservations stay and settle normally. Stamps 'rs' on the primary counter (the reset
-- moment, ms) so the audit leaves the usage recorded before it out of the window.
-- KEYS: [1] the rejected-attempts window (deleted: the count starts again), then the user's
-- counters, the primary counter first. ARGV[1] now ms override or "".
-- Returns how many counters were reset.
local now = clock(ARGV[1])
local done = 0
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  local key = KEYS[i]
  local vals = redis.call('HMGET', key, 'e', 'rv', 'ps')
  local ttl = redis.call('PTTL', key)
  redis.call('DEL', key)
  if vals[1] then
    redis.call('HSET', key, 'e', vals[1])
    if i == 2 then redis.call('HSET', key, 'rs', now) end
    if vals[2] then redis.call('HSET', key, 'rv', vals[2]) end
    if vals[3] then redis.call('HSET', key, 'ps', vals[3], 't', 0) end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    done = done + 1
  end
end
return done
