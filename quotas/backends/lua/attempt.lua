-- attempt: count one rejected request (a 400 or 413 once the client is known) in the client's
-- rejected-attempts window, a sliding window of the request-window geometry (60 s).
-- KEYS[1] the attempts window hash. ARGV[1..5]: see _window.lua. ARGV[6] attempts allowed
-- per window (at least 1).
-- Returns {attempts now in the window, ms until the client may make a request again: 0 while
-- it is under its allowance}. reserve.lua refuses a client at its allowance (status 7).
local now = clock(ARGV[1])
local limit = tonumber(ARGV[6])
local a = open_window(KEYS[1], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
charge(a, 1)
local blocked = 0
if a.total >= limit then blocked = wait_ms(a, 1, limit, now) end
return {a.total, blocked}
