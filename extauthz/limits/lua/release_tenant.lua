-- Free leases of one tenant and settle their reservations, all in the tenant's slot
-- (payloads are read from the tenant's hash, so no global index lookup is needed). One
-- call frees every lease an access-log message names for this tenant.
-- KEYS: 1 leases (zset), 2 lease payloads (hash)
-- ARGV: 1 the tenant's day-count key prefix ("<prefix>:{tenant}:day:"), 2 the global
--       lease index prefix ("<prefix>:lease:"; an entry is removed only when its lease
--       was found, so a wrong tenant hint cannot orphan another tenant's lease), then
--       pairs: lease id, actual tokens (-1: not reported)
-- Returns, per lease, its payload, or false if it was not held (released or expired).
local freed = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local payload = redis.call('HGET', KEYS[2], id)
  local removed = redis.call('ZREM', KEYS[1], id)
  if removed == 0 or not payload then
    freed[#freed + 1] = false
  else
    redis.call('HDEL', KEYS[2], id)
    redis.call('DEL', ARGV[2] .. id)
    local actual = tonumber(ARGV[i + 1])
    if actual >= 0 then
      local lease = cjson.decode(payload)
      local delta = actual - tonumber(lease[4])
      local day = ARGV[1] .. lease[3]
      if delta ~= 0 and redis.call('EXISTS', day) == 1 then
        local now_tokens = redis.call('HINCRBY', day, 'tokens', delta)
        if now_tokens < 0 then redis.call('HSET', day, 'tokens', 0) end
      end
    end
    freed[#freed + 1] = payload
  end
end
return freed
