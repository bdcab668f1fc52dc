--[[
update.lua: set or clear fields of an existing, unrevoked key record (never creates one).

KEYS[1]  edge:key:{kid}   the record
ARGV[…]  field, value pairs; an empty value deletes the field

Reply: 1 done, 0 no such record, -1 the key is revoked (revocation is final: nothing changes).
]]

local current = redis.call('HMGET', KEYS[1], 'hash', 'status')
if not current[1] then return 0 end
if current[2] == 'revoked' then return -1 end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
