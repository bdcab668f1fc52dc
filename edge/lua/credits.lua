--[[
credits.lua: add to (or, with a negative delta, take from) a key's credit balance, atomically
with the admissions that spend it; the balance never goes below 0.

KEYS[1]  edge:key:{kid}   the record
ARGV[1]  delta (a whole number, may be negative)

Reply: the new balance; -1 no such record; -2 the key is revoked; -3 the key has no balance
(unlimited: set one with an update first).
]]

local current = redis.call('HMGET', KEYS[1], 'hash', 'status', 'credits')
if not current[1] then return -1 end
if current[2] == 'revoked' then return -2 end
local balance = current[3]
if not balance or balance == '' then return -3 end
balance = tonumber(string.match(balance, '^%d+$') and balance or '0')
balance = math.max(0, balance + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'credits', balance)
return balance
