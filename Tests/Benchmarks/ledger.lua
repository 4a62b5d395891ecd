-- wrk: POST /track with the Authorino body, the user rotating over N users (as ../shared/peers/track.lua),
-- and a unique x-request-id on every request, as Authorino sends it under Kuadrant (the AuthPolicy
-- forwards Envoy's x-request-id, a UUID): PREFIX (24 characters, "xxxxxxxx-xxxx-4xxx-yxxx-") and a
-- 12-digit hex counter, 36 characters in all. Give each wrk run its own PREFIX: ids never repeat.
-- HEADER (default x-request-id) names the header: another name sends the same bytes with no id
-- the service reads, the reference for what reading one costs (Tests/Benchmarks/request-id).
-- wrk -t1 -c32 -d5s --latency -s ledger.lua http://127.0.0.1:PORT/track -- N PREFIX [START] [HEADER]
local n, prefix, start, i, header = 100, "00000000-0000-4000-8000-", 0, 0, "x-request-id"
local headers = { ["Content-Type"] = "application/json" }
local head = '{"groups":"premium","host":"localhost:8000","method":"POST","path":"/v1/completions","user":"premiumuser'

function init(args)
  if args[1] then n = tonumber(args[1]) end
  if args[2] then prefix = args[2] end
  if args[3] then start = tonumber(args[3]) end
  if args[4] then header = args[4] end
end

function request()
  local u = start + (i % n)
  i = i + 1
  headers[header] = prefix .. string.format("%012x", i)
  return wrk.format("POST", nil, headers, head .. u .. '"}')
end
