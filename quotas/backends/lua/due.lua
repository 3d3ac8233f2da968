-- due: the pending zsets holding reservations past their deadline (by Redis's clock), for the
-- ledger sweep to expire.
-- KEYS[1] due registry (see _window.lua). ARGV[1] now ms override or "", ARGV[2] most keys.
-- Returns those pending keys.
local now = clock(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
