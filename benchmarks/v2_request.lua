-- wrk script for bench_vs_mlserver.py: POSTs one pre-encoded KServe V2 infer request.
--
-- Environment:
--   V2_BODY_FILE      path of the request body (read in binary mode; may hold raw tensors)
--   V2_HEADER_LENGTH  if set, the length of the JSON part of a binary-extension body: sent
--                     as Inference-Header-Content-Length, with Content-Type
--                     application/octet-stream
--   V2_AUTHORIZATION  if set, sent as the Authorization header (a bearer token)
--
-- At the end it prints one machine-readable line:
--   V2RESULT requests=<n> duration_us=<n> errors=<n> status_errors=<n> p50_us=<n> p90_us=<n>
--   p99_us=<n>
-- (on one line). wrk counts responses with status >= 400 in summary.errors.status, so no
-- per-response hook (which would slow wrk down) is needed.

local path = os.getenv("V2_BODY_FILE")
if path == nil then
  error("V2_BODY_FILE is not set")
end
local file = assert(io.open(path, "rb"))
local body = file:read("*a")
file:close()

wrk.method = "POST"
wrk.body = body
local header_length = os.getenv("V2_HEADER_LENGTH")
if header_length ~= nil and header_length ~= "" then
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = header_length
else
  wrk.headers["Content-Type"] = "application/json"
end
local authorization = os.getenv("V2_AUTHORIZATION")
if authorization ~= nil and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    "V2RESULT requests=%d duration_us=%d errors=%d status_errors=%d "
      .. "p50_us=%d p90_us=%d p99_us=%d\n",
    summary.requests, summary.duration, errors, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)
  ))
end
