-- reset: give a user the whole budget back now (an admin action). Keeps the epoch, so the
-- window is not rebuilt from the ledger, and the stored config; in-flight reservations stay
-- and settle normally. Stamps 'rs' (the reset moment, ms) so the audit leaves the usage
-- recorded before it out of the window.
-- KEYS and ARGV[1..5]: see _window.lua. Returns 1.
local now = clock(ARGV[1])
local vals = redis.call('HMGET', KEYS[1], 'e', 'cfg', 'rv')
redis.call('DEL', KEYS[1], KEYS[2])
if vals[1] then
  redis.call('HSET', KEYS[1], 'e', vals[1], 'rs', now)
  if vals[2] then redis.call('HSET', KEYS[1], 'cfg', vals[2]) end
  if vals[3] then redis.call('HSET', KEYS[1], 'rv', vals[3]) end
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 2 * tonumber(ARGV[3]))
end
return 1
