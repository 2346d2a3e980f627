-- wrk script for bench/rest_server.py: POST prepared request bodies round-robin.
--
--   wrk -s bench/rest_wrk.lua URL -- <body-prefix> <count> <content-type>
--   wrk -s bench/rest_wrk.lua URL -- - 0 GET        (GET the URL, no body)
--
-- Bodies are read from files <body-prefix>.0 .. <body-prefix>.<count-1> (real
-- MNIST test images, written by the bench). At the end one line
-- "WRK_JSON {...}" reports requests, errors and latency percentiles in
-- microseconds for the bench to parse.

local bodies = {}
local content_type = "application/json"
local counter = 0

function init(args)
  local prefix, count = args[1], tonumber(args[2])
  content_type = args[3] or content_type
  if content_type == "GET" then
    return
  end
  if prefix == nil or count == nil or count < 1 then
    error("usage: wrk -s rest_wrk.lua URL -- <body-prefix> <count> <content-type>")
  end
  for i = 0, count - 1 do
    local name = prefix .. "." .. i
    local file = assert(io.open(name, "rb"), "cannot open " .. name)
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
  -- Threads start at different bodies so that they do not send the same image in step.
  counter = math.random(0, #bodies - 1)
end

function request()
  if content_type == "GET" then
    return wrk.format("GET")
  end
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]
  return wrk.format("POST", nil, { ["Content-Type"] = content_type }, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "latency_us": {"p50": %d, "p90": %d, ' ..
    '"p99": %d, "p999": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
