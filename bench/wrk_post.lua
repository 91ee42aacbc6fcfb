-- wrk script for bench/overhead.py: every request is the same small non-streaming chat completion.
-- The model name matches the pool's model, so the proxy forwards the body bytes untouched.
wrk.method = "POST"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
