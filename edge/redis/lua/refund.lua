--[[
refund.lua: give back the credit of an admitted request the upstream never received (its
connection could not be made), as DESIGN §5 allows; rate-limit tokens are never refunded.

KEYS[1]  edge:key:{kid}   the key record
ARGV[…]  none

Reply: the balance after the refund, or -1 when the key has no balance to refund to
(unlimited, or not a whole number).
]]

local credits = redis.call('HGET', KEYS[1], 'credits')
if not credits or #credits > 12 or not string.match(credits, '^%d+$') then return -1 end
if credits == '999999999999' then return tonumber(credits) end  -- the most a balance holds
return redis.call('HINCRBY', KEYS[1], 'credits', 1)
