-- wrk script for bench/overhead.py --only tenants: the body of wrk_post.lua, and the limited tenant's key
-- (case_tenants.TENANT_KEY) as `Authorization: Bearer`. Targets without tenants ignore the header.
wrk.method = "POST"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-tenant-key-1"
