# podterm container images.
#
#   docker build -t podterm:0.1.0 .                              the gateway (default target)
#   docker build --target agent -t podterm-agent:0.1.0 .         the sidecar agent
#
# Stages: web (xterm.js from npm, pinned by web/package-lock.json) -> build
# (gcc + Cython: the wheel with the native codec, installed into a venv) ->
# agent (Debian slim: the agent runs shells, so it has bash and coreutils) ->
# gateway (distroless Python: no shell, no package manager).  All three
# runtime-related stages are the same Debian release (13, Python 3.13), so the
# venv's interpreter (/usr/bin/python3) and the compiled codec's ABI match.
# Pin the base images by digest in your registry for reproducible builds.

# --- web: the web terminal's vendored front-end files ------------------------------
FROM node:22-bookworm-slim AS web
WORKDIR /build
COPY web/package.json web/package-lock.json web/
COPY scripts/build_web.sh scripts/
RUN bash scripts/build_web.sh

# --- build: the wheel, with the Cython codec required ---------------------------
FROM debian:13-slim AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PODTERM_NATIVE=require
# Package versions come with the pinned Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/podterm
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native/ native/
COPY src/ src/
COPY --from=web /build/src/podterm/gateway/web/vendor/ src/podterm/gateway/web/vendor/
# pip wheel builds podterm (setup.py cythonizes native/*.pyx; PODTERM_NATIVE=require
# makes a failed compile an error) and every dependency as a wheel; the venv
# gets them from that directory only.  `podterm version --verbose` exits 1
# unless the native codec loads, and the web assets must be in the package.
RUN /opt/podterm/bin/pip wheel --wheel-dir /wheels . \
    && /opt/podterm/bin/pip install --no-index --find-links /wheels podterm \
    && /opt/podterm/bin/podterm version --verbose \
    && /opt/podterm/bin/python -c "import importlib.resources as r; \
assert r.files('podterm').joinpath('gateway/web/vendor/xterm.js').is_file()" \
    && /opt/podterm/bin/pip uninstall -y pip setuptools

# --- agent: the sidecar (target "agent") -----------------------------------------
FROM debian:13-slim AS agent
# The shells users open run here: bash, ps, less; python3 for the venv.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates procps less \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 podterm \
    && useradd --uid 65532 --gid 65532 --home-dir /home/podterm --create-home \
        --shell /bin/bash podterm
COPY --from=build /opt/podterm /opt/podterm
ENV PATH=/opt/podterm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PODTERM_NATIVE=require \
    HOME=/home/podterm \
    SHELL=/bin/bash
USER 65532:65532
WORKDIR /home/podterm
ENTRYPOINT ["podterm"]
CMD ["agent"]

# --- gateway: the default target -------------------------------------------------
# uid 65532 is distroless' "nonroot"; numeric, so runAsNonRoot can verify it.
FROM gcr.io/distroless/python3-debian13:nonroot AS gateway
COPY --from=build /opt/podterm /opt/podterm
ENV PATH=/opt/podterm/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PODTERM_NATIVE=require
USER 65532:65532
# The reference deployment's listener (deploy/base/config/podterm.toml).  With no
# flags podterm serve listens on 127.0.0.1:7780 only: give --listen 0.0.0.0:7443
# (and TLS) to reach it from outside the container.
EXPOSE 7443
ENTRYPOINT ["podterm"]
CMD ["serve"]
