-- correct: add a signed amount to each layer's counter in the bucket (or calendar period) a
-- request was charged to. On Redis Cluster a decision whose layers live in other slots than
-- the user's runs one reserve per slot: this gives back what one slot's layers took when
-- another slot refused (or failed), and applies a settle's correction (actual - estimate)
-- to the layers outside the user's slot. A bucket already out of the window takes nothing;
-- a counter Redis lost (no epoch) is left alone: it is rebuilt from the ledger.
-- KEYS: [1 .. N] the layers' counters (all in one slot).
-- ARGV: [1] now ms override or "", [2] the ms the request was charged at, [3] N layers,
--       [4 ..] 7 values per layer (see _window.lua) whose amount is the signed units to add.
-- Returns {total, reset ms} of every layer, flattened.
local now = clock(ARGV[1])
local at = tonumber(ARGV[2])
local layers = read_layers(1, 4, tonumber(ARGV[3]), now, at)
for _, w in ipairs(layers) do
  if w.amount ~= 0 and w.epoch then layer_correct(w, at, w.amount) end
end
return layer_figures(layers, now)
