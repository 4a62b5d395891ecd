-- wrk: POST /track with a body for Tests/Benchmarks/metering-4x2.yaml (4 labels, 2 families), the
-- user rotating over N distinct users, as track.lua does for the built-in config.
-- wrk -t1 -c32 -d10s --latency -s metering.lua http://127.0.0.1:PORT/track -- [N]
local n, i = 100, 0
local headers = { ["Content-Type"] = "application/json" }
local head = '{"groups":"premium","host":"localhost:8000","method":"POST","path":"/v1/completions","tier":"gold",'
  .. '"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42},"user":"premiumuser'
function init(args)
  if args[1] then n = tonumber(args[1]) end
end
function request()
  local u = i % n
  i = i + 1
  return wrk.format("POST", nil, headers, head .. u .. '"}')
end
