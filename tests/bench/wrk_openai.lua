-- wrk script for bench_gateway.py: POSTs one OpenAI request body over and over.
--   ARGOSY_BENCH_BODY    the JSON request body
--   ARGOSY_BENCH_STREAM  "1": check every response is a complete SSE stream and count its tokens
--   ARGOSY_BENCH_TOKENS  the number of tokens each stream must carry
--   ARGOSY_BENCH_DELAY_MS if > 0, each connection pauses this long on average after every
--                        response (a paced load below saturation; the pause is drawn uniformly
--                        from 0 to twice that, so the connections do not move in lockstep)
-- done() prints one JSON line (prefixed "ARGOSY_RESULT ") that bench_gateway.py parses.

wrk.method = "POST"
wrk.body = os.getenv("ARGOSY_BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"

local streaming = os.getenv("ARGOSY_BENCH_STREAM") == "1"
local delay_ms = tonumber(os.getenv("ARGOSY_BENCH_DELAY_MS") or "0")
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
   tokens = 0
   incomplete = 0
   seen = 0
end

-- wrk only buffers bodies (and costs a Lua call per response) when response() exists,
-- so it is defined for streaming runs only; non-2xx statuses are counted by wrk itself.
-- Every stream must end with [DONE]; the tokens of one stream in SAMPLE_EVERY are counted
-- exactly (counting all of them would make wrk, not the system under test, the bottleneck)
-- and a sampled stream without the expected count is reported as incomplete.
local expected_tokens = tonumber(os.getenv("ARGOSY_BENCH_TOKENS") or "0")
local SAMPLE_EVERY = 16
local DONE = "data: [DONE]\n\n"
if streaming then
   function response(status, headers, body)
      seen = seen + 1
      if status ~= 200 or string.sub(body, -#DONE) ~= DONE then
         incomplete = incomplete + 1
         return
      end
      if seen % SAMPLE_EVERY == 0 then
         local _, count = string.gsub(body, '"delta":{"content":', "")
         if count ~= expected_tokens then
            incomplete = incomplete + 1
            return
         end
      end
      tokens = tokens + expected_tokens
   end
end

if delay_ms > 0 then
   function delay()
      return math.random(0, 2 * delay_ms)
   end
end

function done(summary, latency, requests)
   local total_tokens, total_incomplete = 0, 0
   for _, thread in ipairs(threads) do
      total_tokens = total_tokens + (thread:get("tokens") or 0)
      total_incomplete = total_incomplete + (thread:get("incomplete") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      'ARGOSY_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"tokens":%d,"incomplete":%d,' ..
      '"errors":%d,"non_2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, total_tokens, total_incomplete,
      errors.connect + errors.read + errors.write + errors.timeout, errors.status,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
