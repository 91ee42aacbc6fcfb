# splitstream: one process per container (one core); run more replicas for more cores.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN pip install . && useradd --system --uid 10001 splitstream
COPY rules ./rules

USER splitstream
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
# SIGTERM drains: no new connections, requests in flight finish (server.drain_timeout), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["splitstream"]
CMD ["serve", "--rules", "/app/rules", "--host", "0.0.0.0", "--port", "8080"]
