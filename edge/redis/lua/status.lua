--[[
status.lua: move a key to another status; revoked is final.

KEYS[1]  edge:key:{kid}   the record
ARGV[1]  the new status: active | paused | revoked

Revoking also drops a rotated-out key still in its grace period.
Reply: 1 done, 0 no such record, -1 the key is revoked and the new status is not.
]]

local status = redis.call('HGET', KEYS[1], 'status')
if not redis.call('HGET', KEYS[1], 'hash') then return 0 end
if status == 'revoked' and ARGV[1] ~= 'revoked' then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[1] == 'revoked' then
  redis.call('HDEL', KEYS[1], 'prev_hash', 'prev_until')
end
return 1
