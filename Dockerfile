# One image for every citypulse service (collector, writer, rule worker, migrations).
# Production install: no `embedded` extra (no tansu, no embedded PostgreSQL in the image).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install /app \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin citypulse \
    && mkdir -p /etc/citypulse /var/lib/citypulse \
    && cp /app/deploy/registry.example.yaml /etc/citypulse/registry.yaml \
    && chown citypulse /var/lib/citypulse

USER citypulse
ENV CITYPULSE_REGISTRY=/etc/citypulse/registry.yaml \
    CITYPULSE_STATE_DIR=/var/lib/citypulse \
    CITYPULSE_METRICS_PORT=9100
EXPOSE 9100

# /healthz on the metrics port (citypulse.service); the one-shot `migrate` has no server,
# compose disables the check for it.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]

ENTRYPOINT ["citypulse"]
CMD ["--help"]
