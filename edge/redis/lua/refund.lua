--[[
refund.lua: give back the request price of an admitted request the upstream never received
(its connection could not be made); rate-limit tokens are never refunded.

KEYS[1]  edge:key:{kid}   the key record
ARGV[1]  the credits the request was charged (pricing.request)
ARGV[2]  days of usage history to keep (usage.retention_days)

The credits given back are taken off the key's usage history (include/usage.lua) for the
current hour: the request is still counted, its price is not.

Reply: the balance after the refund, or -1 when the key has no balance to refund to
(unlimited, or not a whole number). A balance never passes 999999999999 (see credits.lua).
]]

--#include usage

local credits = redis.call('HGET', KEYS[1], 'credits')
if not credits or #credits > 13 or not string.match(credits, '^%-?%d+$') then return -1 end
local balance = math.min(tonumber(credits) + tonumber(ARGV[1]), 999999999999)
redis.call('HSET', KEYS[1], 'credits', string.format('%d', balance))
usage_count(KEYS[1], tonumber(redis.call('TIME')[1]), tonumber(ARGV[2]),
  {'credits', -tonumber(ARGV[1])})
return balance
