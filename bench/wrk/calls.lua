-- POST /v1/calls as fast as the server answers (closed loop: saturation), each call with the
-- next consumer key in turn; wrk's own cost per request is a fifth of k6's. At the end, one
-- JSON line with the counts and latency percentiles (bench/loadgen.py reads it).
local keys = {}
for key in string.gmatch(os.getenv("KEYS") or "none", "[^,]+") do
  keys[#keys + 1] = key
end
local path = os.getenv("CALL_PATH") or "/v1/calls"
local hook = os.getenv("HOOK") or ""
local head = '{"api":"' .. (os.getenv("API") or "bench") .. '","params":{"n":'
local tail = "}" .. (hook ~= "" and (',"webhook_url":"' .. hook .. '"') or "") .. "}"
local n = 0

request = function()
  n = n + 1
  return wrk.format("POST", path, {
    ["content-type"] = "application/json",
    ["authorization"] = "Bearer " .. keys[n % #keys + 1],
  }, head .. n .. tail)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"wrk_summary":{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,'
      .. '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
