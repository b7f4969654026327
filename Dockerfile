# tidegate serving the shipped models. The install step is the Makefile's own
# `make install`, the same target `make serve` and `make test` build on, so the
# image cannot drift from what CI tests: the same constraints.txt pins every version.
FROM python:3.11-slim

# g++ (with gcc and the C library's headers): numba.pycc compiles the drift kernels ahead
# of time with it. It stays in the image: the build is for the CPU it runs on (the cache
# key names it), so a container on another CPU builds its own at the first model load
# (~15-30 s) rather than falling back to Numba's JIT, which costs ~120 MiB per process.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends make g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 tidegate

# The kernel cache: Numba's (for the JIT fall-back) and, below it, tidegate-aot/ with the
# kernels compiled ahead of time. The non-root user must own it.
ENV PATH=/opt/tidegate/bin:$PATH \
    NUMBA_CACHE_DIR=/var/cache/tidegate/numba \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md Makefile constraints.txt ./
COPY src ./src
# make install compiles the drift kernels into the cache too; `tidegate kernels build`
# again fails the image build if that did not work, rather than serving with the JIT.
RUN make install VENV=/opt/tidegate \
    && tidegate kernels build

COPY models ./models
RUN mkdir -p "$NUMBA_CACHE_DIR" \
    && chown -R tidegate:tidegate /var/cache/tidegate /app/models

USER tidegate
EXPOSE 8000 8001
# With an auth file, health needs a reader's token: pass one as TIDEGATE_HEALTH_TOKEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; t = os.environ.get('TIDEGATE_HEALTH_TOKEN'); h = {'Authorization': 'Bearer ' + t} if t else {}; sys.exit(u.urlopen(u.Request('http://127.0.0.1:8000/v2/health/ready', headers=h), timeout=2).status != 200)"]
# Inside a container the port is published by the runtime, so bind every interface;
# beyond loopback tidegate needs an auth file (mount one here; see the README).
CMD ["tidegate", "serve", "/app/models", "--host", "0.0.0.0", "--port", "8000", "--grpc-port", "8001", "--auth-file", "/etc/tidegate/auth.toml"]
