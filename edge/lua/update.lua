--[[
update.lua: set or clear fields of an existing key record (never creates one).

KEYS[1]  edge:key:{kid}   the record
ARGV[…]  field, value pairs; an empty value deletes the field

Reply: 1 done, 0 no such record.
]]

if not redis.call('HGET', KEYS[1], 'hash') then return 0 end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
