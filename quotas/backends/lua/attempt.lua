-- attempt: count one rejected request (a 400 or 413 once the client is known) in the client's
-- rejected-attempts window, a sliding window of the request-window geometry (60 s).
-- KEYS[1] the attempts window hash, KEYS[2] the client's primary token counter: when it
-- holds 'ab' (see _window.lua), that becomes the moment this attempt leaves the window, so a
-- reserve that finds 'ab' in the past knows the window empty without reading it.
-- ARGV[1..5]: see _window.lua. ARGV[6] attempts allowed per window (at least 1).
-- Returns {attempts now in the window, ms until the client may make a request again: 0 while
-- it is under its allowance}. reserve.lua refuses a client at its allowance (status 7).
local now = clock(ARGV[1])
local limit = tonumber(ARGV[6])
local a = open_window(KEYS[1], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
charge(a, 1)
if redis.call('HEXISTS', KEYS[2], 'ab') == 1 then
  redis.call('HSET', KEYS[2], 'ab', now + reset_ms(a, now))
end
local blocked = 0
if a.total >= limit then blocked = wait_ms(a, 1, limit, now) end
return {a.total, blocked}
