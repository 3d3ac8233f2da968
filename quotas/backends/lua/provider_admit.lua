-- provider_admit: may one call go to a provider's model now? Decided from what the provider
-- told every process (its x-ratelimit-* headers, its 429s), the adaptive rate and the circuit
-- breaker; admitting charges the learned budgets at once, so processes never count the same
-- remaining twice. (_window.lua is prepended: only its clock() is used here.)
-- KEYS[1] the provider state hash of one provider key and model (fields: provider_observe.lua).
-- ARGV[1] now ms override or "", ARGV[2] the call's estimated tokens, ARGV[3] ms a probe may
-- take before another call probes instead.
-- Returns {status, wait ms, probe, now ms} (observe needs when the call was admitted): status 1 admitted (probe 1: this call goes first to learn
-- the provider's figures, or to test an open breaker); held back: 2 a provider 429's
-- retry-after, 3 the breaker is open, 4 another call is probing, 5 no requests left in the
-- provider's window, 6 not enough tokens left in it, 7 the adaptive rate. Held back: nothing
-- is charged.
local now = clock(ARGV[1])
local tokens, probe_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local key = KEYS[1]
local v = redis.call('HMGET', key, 'seen', 'pu', 'bu', 'bs', 'bo', 'rr', 'rt', 'tr', 'tt',
                     'rate', 'tat', 'b0', 'b1', 'bi')
local seen, probe_until, backoff = v[1], tonumber(v[2]), tonumber(v[3])
local breaker, open_until = tonumber(v[4]) or 0, tonumber(v[5]) or 0
local req_left, req_reset = tonumber(v[6]), tonumber(v[7])
local tok_left, tok_reset = tonumber(v[8]), tonumber(v[9])
local rate, tat = tonumber(v[10]) or 0, tonumber(v[11]) or 0

if breaker == 1 and now < open_until then return {3, open_until - now, 0, now} end
if backoff and now < backoff then return {2, backoff - now, 0, now} end

-- A probe goes alone: the first call ever (no figures yet), the first after a learned window
-- ended (its new figures are unknown until an answer brings them), a half-open breaker's test.
local expired = (req_reset and now >= req_reset) or (tok_reset and now >= tok_reset)
local probe = breaker ~= 0 or not seen or expired
if probe and probe_until and now < probe_until then
  return {4, math.min(probe_until - now, 100), 0, now}
end
if not expired then
  if req_left and req_left < 1 then return {5, req_reset - now, 0, now} end
  if tok_left and tok_left < tokens then return {6, tok_reset - now, 0, now} end
end
if rate > 0 then
  if tat > now then return {7, math.ceil(tat - now), 0, now} end
  redis.call('HSET', key, 'tat', tostring(math.max(tat, now) + 1000 / rate))
end

if breaker == 1 then redis.call('HSET', key, 'bs', 2) end  -- open -> half-open: this probe
if probe then redis.call('HSET', key, 'pu', now + probe_ms) end
if req_left and not expired then redis.call('HINCRBY', key, 'rr', -1) end
if tok_left and not expired then redis.call('HINCRBY', key, 'tr', -tokens) end
redis.call('HINCRBY', key, 'fi', 1)
redis.call('HINCRBY', key, 'ft', tokens)
-- Calls admitted per 5 s bucket (this one and the one before): the rate a 429 answers.
local bucket = math.floor(now / 5000)
local bi = tonumber(v[14])
if bi == bucket then
  redis.call('HINCRBY', key, 'b0', 1)
else
  local prev = 0
  if bi == bucket - 1 then prev = tonumber(v[12]) or 0 end
  redis.call('HSET', key, 'b1', prev, 'b0', 1, 'bi', bucket)
end
return {1, 0, probe and 1 or 0, now}
