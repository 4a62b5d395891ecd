-- wrk: GET /usage for user u1 … uN in turn (the users Tests/Benchmarks/shared-ledger fills), so
-- no answer comes from the cache until the turn comes round again.
-- wrk -t1 -c8 -d5s --latency -s usage.lua http://127.0.0.1:PORT/usage -- N
local n, i = 100000, 0

function init(args)
  if args[1] then n = tonumber(args[1]) end
end

function request()
  i = i + 1
  return wrk.format("GET", "/usage?user=u" .. ((i % n) + 1))
end
