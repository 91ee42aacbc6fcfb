-- wrk script for bench/overhead.py --only sticky: the body of wrk_post.lua, and an `x-user-id` header that
-- cycles through 10,000 subjects, so a sticky split sees both first assignments and stored ones.
local body = '{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
local counter = 0

request = function()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json", ["x-user-id"] = "user-" .. (counter % 10000)}
  return wrk.format("POST", nil, headers, body)
end
