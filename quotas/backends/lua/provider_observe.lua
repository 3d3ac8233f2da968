-- provider_observe: what one call to a provider's model taught, for every process.
-- KEYS[1] the provider state hash, KEYS[2] the registry of state hashes (a set; for the staff
-- endpoint). (_window.lua is prepended: only its clock() is used here.)
-- ARGV[1] now ms override or "", ARGV[2] outcome: "ok" (answered), "limited" (a 429),
-- "failed" (5xx, timeout, connection error: counts for the breaker), "answered" (another
-- error status: the provider is alive), "released" (admitted but never sent), ARGV[3] the
-- call's estimated tokens (as admitted), ARGV[4] "1" if the call was the probe,
-- ARGV[5..11] the headers' figures, -1 when absent: requests limit, remaining, reset ms;
-- tokens limit, remaining, reset ms; retry-after ms,
-- ARGV[12] failures that open the breaker, ARGV[13] ms it stays open, ARGV[14] rate
-- decrease factor, ARGV[15] recovery step (share of the rate that met the 429, per success),
-- ARGV[16] least rate (calls/s), ARGV[17] backoff ms of a 429 without retry-after,
-- ARGV[18] TTL ms of the state, ARGV[19] when the call was admitted (ms, as admit said).
-- Hash fields: seen (an answer came once), pu (probe deadline ms), fi / ft (calls / tokens
-- admitted and not yet observed), rl rr rt / tl tr tt (the provider's requests / tokens limit,
-- remaining as every process has drawn on it, reset at ms), rs / ts (when the call that
-- taught that window was admitted), bu (held back until ms: a 429),
-- rate (allowed calls/s, 0: none), ceil (the rate that met the last 429), tat (next
-- admission ms at that rate), b0 b1 bi (admissions per 5 s bucket), bs (breaker: 0 closed,
-- 1 open, 2 half-open), bf (consecutive failures), bo (open until ms), n429 / nok (counts).
-- Returns {breaker state, rate as text}.
local now = clock(ARGV[1])
local key, outcome, tokens = KEYS[1], ARGV[2], tonumber(ARGV[3])

local in_flight = math.max(redis.call('HINCRBY', key, 'fi', -1), 0)
local tokens_in_flight = math.max(redis.call('HINCRBY', key, 'ft', -tokens), 0)
redis.call('HSET', key, 'fi', in_flight, 'ft', tokens_in_flight)
if ARGV[4] == '1' then redis.call('HDEL', key, 'pu') end

-- One budget (requests or tokens) from the headers. A call admitted after the known window
-- ended (the probe) starts the new one: the provider counted it, maybe not the calls still
-- in flight, so they are taken off (never too many admitted). Within a known window every
-- process has drawn on the same remaining for each call it admitted, so the provider's
-- figure cannot be lower unless someone else uses the key: only then does it lower ours
-- (with the calls in flight taken off too). A call admitted before the window was learned
-- tells nothing of it. A budget whose window ended and that this answer does not describe
-- is forgotten (else every call would wait to probe it).
local admitted = tonumber(ARGV[19])
local function learn(lf, rf, tf, sf, limit, remaining, reset, others)
  local old = redis.call('HMGET', key, rf, tf, sf)
  local old_left, old_reset, since = tonumber(old[1]), tonumber(old[2]), tonumber(old[3])
  if remaining < 0 or reset < 0 then
    if old_reset and now >= old_reset then redis.call('HDEL', key, rf, tf, sf) end
    return
  end
  if limit >= 0 then redis.call('HSET', key, lf, limit) end
  if old_reset and admitted < old_reset then
    if since and admitted < since then return end
    if old_left and remaining < old_left then
      redis.call('HSET', key, rf, math.min(old_left, remaining - others))
    end
    return
  end
  redis.call('HSET', key, rf, remaining - others, tf, now + reset, sf, admitted)
end

local v = redis.call('HMGET', key, 'rate', 'ceil', 'b0', 'b1', 'bi', 'bs', 'bf')
local rate, ceil = tonumber(v[1]) or 0, tonumber(v[2]) or 0
local breaker, failures = tonumber(v[6]) or 0, tonumber(v[7]) or 0

if outcome == 'released' then
  -- Never sent: give back what admitting drew (still this window's, when one is known).
  local r = redis.call('HMGET', key, 'rr', 'rt', 'tr', 'tt')
  if r[1] and now < tonumber(r[2]) then redis.call('HINCRBY', key, 'rr', 1) end
  if r[3] and now < tonumber(r[4]) then redis.call('HINCRBY', key, 'tr', tokens) end
  if breaker == 2 and ARGV[4] == '1' then redis.call('HSET', key, 'bs', 1) end
  return {breaker, tostring(rate)}
end

redis.call('HSET', key, 'seen', 1)
learn('rl', 'rr', 'rt', 'rs', tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
      in_flight)
learn('tl', 'tr', 'tt', 'ts', tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]),
      tokens_in_flight)

if outcome == 'limited' then
  -- Multiplicative decrease from the rate that met the 429 (admissions of the last 5-10 s).
  local bucket, frac = math.floor(now / 5000), (now % 5000) / 5000
  local cur, prev = 0, 0
  if tonumber(v[5]) == bucket then cur, prev = tonumber(v[3]) or 0, tonumber(v[4]) or 0 end
  if tonumber(v[5]) == bucket - 1 then prev = tonumber(v[3]) or 0 end
  local measured = (prev * (1 - frac) + cur) / 5
  if rate > 0 and rate < measured then measured = rate end
  ceil = math.max(measured, tonumber(ARGV[16]))
  rate = math.max(ceil * tonumber(ARGV[14]), tonumber(ARGV[16]))
  local wait = tonumber(ARGV[11])
  if wait < 0 then wait = tonumber(ARGV[17]) end
  redis.call('HSET', key, 'rate', tostring(rate), 'ceil', tostring(ceil), 'bu', now + wait,
             'tat', tostring(now + wait))
  redis.call('HINCRBY', key, 'n429', 1)
elseif outcome == 'ok' then
  -- Additive recovery; at the rate that met the 429 the limit is lifted.
  if rate > 0 then
    rate = rate + ceil * tonumber(ARGV[15])
    if rate >= ceil then rate = 0 end
    redis.call('HSET', key, 'rate', tostring(rate))
  end
  redis.call('HINCRBY', key, 'nok', 1)
end

if outcome == 'failed' then
  failures = failures + 1
  if breaker == 2 or failures >= tonumber(ARGV[12]) then
    breaker = 1
    redis.call('HSET', key, 'bs', 1, 'bo', now + tonumber(ARGV[13]))
  end
  redis.call('HSET', key, 'bf', failures)
else
  -- The provider answered: it is alive.
  breaker = 0
  redis.call('HSET', key, 'bs', 0, 'bf', 0)
end
redis.call('PEXPIRE', key, tonumber(ARGV[18]))
redis.call('SADD', KEYS[2], key)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[18]))
return {breaker, tostring(rate)}
