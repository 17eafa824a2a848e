-- struct_probe: the start-up check that this Redis has the Lua `struct` library,
-- which complete.lua unpacks every settle batch with. Redis has bundled it since 2.6,
-- but a build without it would refuse every settle; the daemon refuses to start
-- instead (scripts.check_lua). Packs and unpacks one complete.lua entry header.
local packed = struct.pack('>c1I2I2I4I4', 'S', 1, 2, 3, 70000)
local op, le, li, lp, lx, pos = struct.unpack('>c1I2I2I4I4', packed, 1)
if op ~= 'S' or le ~= 1 or li ~= 2 or lp ~= 3 or lx ~= 70000 or pos ~= 14 then
  return redis.error_reply('struct.unpack returned ' .. tostring(op) .. ' ' ..
                           tostring(le) .. ' ' .. tostring(lx) .. ' at ' .. tostring(pos))
end
return 1
