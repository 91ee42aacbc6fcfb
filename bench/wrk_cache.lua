-- wrk script for bench/overhead.py --only cache: the body of wrk_post.lua with "temperature":0, so the
-- proxy's result cache may keep and replay it (the case warms the one entry before measuring).
wrk.method = "POST"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8,"temperature":0}'
wrk.headers["Content-Type"] = "application/json"
