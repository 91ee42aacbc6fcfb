"""Status pages (aiohttp-jinja2, server-rendered) and their JSON twins under /admin/; see `views.py`."""
