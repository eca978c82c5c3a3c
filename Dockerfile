# Sluice container image.
#   docker build -t sluice .
#   docker run -p 8000:8000 -p 8001:8001 -v $PWD/rules.yaml:/etc/sluice/rules.yaml:ro sluice
# The rules file is read from /etc/sluice/rules.yaml (mount yours there); set
# `listen: 0.0.0.0:8000` and `admin: {listen: 0.0.0.0:8001}` in it for a container.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice \
    && mkdir -p /etc/sluice
COPY deploy/docker/rules.yaml /etc/sluice/rules.yaml

USER sluice
WORKDIR /var/lib/sluice
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["sluice"]
CMD ["serve", "-c", "/etc/sluice/rules.yaml"]
