-- wrk: POST /track with a new user on every request, stopping after COUNT replies.
-- wrk -t1 -c32 -d120s -s distinct.lua URL -- COUNT START
local count, start, sent, received = 100000, 0, 0, 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  if args[1] then count = tonumber(args[1]) end
  if args[2] then start = tonumber(args[2]) end
end

function request()
  local user = start + sent
  sent = sent + 1
  return wrk.format("POST", nil, headers,
    '{"groups":"bench","host":"bench","method":"POST","path":"/v1/completions","user":"distinct' .. user .. '"}')
end

function response(status, headers, body)
  received = received + 1
  if received >= count then wrk.thread:stop() end
end
