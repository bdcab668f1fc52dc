--[[
credits.lua: add to (or, with a negative delta, take from) a key's credit balance, atomically
with the admissions that spend it; the balance never goes below 0.

KEYS[1]  edge:key:{kid}   the record
ARGV[1]  delta (a whole number, may be negative)

A balance is at most 999999999999 (12 digits: what admit.lua reads as a number; a longer
value would read as garbage, i.e. no credits left).

A balance may be below zero (usage that was in flight when it ran out): a top-up adds to it,
and taking away never takes a balance below zero, nor a debt deeper.

Reply: {0, the new balance}; {1} no such record; {2} the key is revoked; {3} the key has no
balance (unlimited: set one with an update first); {4} the balance would pass the maximum
(nothing changes).
]]

local MAX = 999999999999

local current = redis.call('HMGET', KEYS[1], 'hash', 'status', 'credits')
if not current[1] then return {1} end
if current[2] == 'revoked' then return {2} end
local balance = current[3]
if not balance or balance == '' then return {3} end
if #balance > 13 or not string.match(balance, '^%-?%d+$') then balance = '0' end
balance = tonumber(balance)
local new = math.max(balance + tonumber(ARGV[1]), math.min(balance, 0))
if new > MAX then return {4} end
redis.call('HSET', KEYS[1], 'credits', string.format('%d', new))
return {0, new}
