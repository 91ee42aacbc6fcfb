-- wrk script for bench/overhead.py --only responses: the request of wrk_post.lua on the OpenAI Responses API
-- (POST /v1/responses), not stored. Must stay byte-identical to stack.RESPONSES_BODY.
wrk.method = "POST"
wrk.body = '{"model":"sim-model","input":"Hello there","max_output_tokens":8,"store":false}'
wrk.headers["Content-Type"] = "application/json"
