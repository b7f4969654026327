# tidegate serving the shipped models. The install step is the Makefile's own
# `make install`, the same target `make serve` and `make test` build on, so the
# image cannot drift from what CI tests: the same constraints.txt pins every version.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install --yes --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 tidegate

WORKDIR /app
COPY pyproject.toml README.md Makefile constraints.txt ./
COPY src ./src
RUN make install VENV=/opt/tidegate

COPY models ./models
# Numba writes its compiled-kernel cache here; the non-root user must own it.
ENV PATH=/opt/tidegate/bin:$PATH \
    NUMBA_CACHE_DIR=/var/cache/tidegate/numba \
    PYTHONUNBUFFERED=1
# Compile the drift kernels into that cache now: a cold compile takes ~10 s at start-up.
RUN mkdir -p "$NUMBA_CACHE_DIR" \
    && python -c "from tidegate import kernels; kernels.warm_up()" \
    && chown -R tidegate:tidegate /var/cache/tidegate /app/models

USER tidegate
EXPOSE 8000
# With an auth file, health needs a reader's token: pass one as TIDEGATE_HEALTH_TOKEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; t = os.environ.get('TIDEGATE_HEALTH_TOKEN'); h = {'Authorization': 'Bearer ' + t} if t else {}; sys.exit(u.urlopen(u.Request('http://127.0.0.1:8000/v2/health/ready', headers=h), timeout=2).status != 200)"]
# Inside a container the port is published by the runtime, so bind every interface;
# beyond loopback tidegate needs an auth file (mount one here; see the README).
CMD ["tidegate", "serve", "/app/models", "--host", "0.0.0.0", "--port", "8000", "--auth-file", "/etc/tidegate/auth.toml"]
