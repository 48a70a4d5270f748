-- wrk script: POST a JSON-RPC message/send whose messageId is new each time
-- (a repeated messageId would be answered from the live item, not enqueued).
-- Usage: wrk -s bench/post.lua URL -- <messageId prefix>
-- Prints one line "WRKJSON {...}" with the totals and latency percentiles.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local prefix = "wrk"
local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  prefix = args[1] or "wrk"
end

function request()
  counter = counter + 1
  local body = '{"jsonrpc":"2.0","id":' .. counter
    .. ',"method":"message/send","params":{"message":{"role":"user","messageId":"'
    .. prefix .. "-" .. tid .. "-" .. counter
    .. '","parts":[{"kind":"text","text":"hello from the benchmark"}]}'
    .. ',"configuration":{"blocking":false}}}'
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
