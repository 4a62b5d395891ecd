-- wrk: POST /track with a new user on every request, numbered from START.
-- wrk -t1 -c32 -d3s -s distinct.lua URL -- START
local start, sent = 0, 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  if args[1] then start = tonumber(args[1]) end
end

function request()
  local user = start + sent
  sent = sent + 1
  return wrk.format("POST", nil, headers,
    '{"groups":"bench","host":"bench","method":"POST","path":"/v1/completions","user":"distinct' .. user .. '"}')
end
