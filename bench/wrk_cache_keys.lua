-- wrk script for bench/overhead.py --only cache: 1,000 temperature-0 bodies in turn ("Hello there 0" ..
-- "Hello there 999"; the case warms every one first), so requests in flight at once almost never share a
-- key and each is its own store lookup instead of following an identical one (single-flight).
-- Must stay byte-identical to case_cache.keyed_body().
local requests = {}
local n = 1000
local counter = 0

init = function(args)
  for i = 0, n - 1 do
    local body = '{"model":"sim-model","messages":[{"role":"user","content":"Hello there ' .. i ..
                 '"}],"max_tokens":8,"temperature":0}'
    requests[i] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
  end
end

request = function()
  counter = counter + 1
  return requests[counter % n]
end
