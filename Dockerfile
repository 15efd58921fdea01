# One image for ambient-lite's three programs; the first argument picks the program:
#   docker run IMAGE istiod_lite --help
#   docker run IMAGE ztunnel --help
#   docker run IMAGE waypoint --help
# Built and pushed as ghcr.io/ambient-lite/ambient-lite:<version> (manifests/ reference it):
#   docker build -t ghcr.io/ambient-lite/ambient-lite:0.1.0 .
FROM python:3.11-slim

# iptables and iproute2: ztunnel's traffic capture in pods' network namespaces.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Metadata first so the dependency layer is reused while only the code changes.
COPY pyproject.toml README.md LICENSE ./
COPY ambient_common ./ambient_common
COPY ambient_api ./ambient_api
COPY ambient_dataplane ./ambient_dataplane
COPY istiod_lite ./istiod_lite
COPY ztunnel ./ztunnel
COPY waypoint ./waypoint
COPY ambientctl ./ambientctl
RUN pip install . && rm -rf /src

# 1337: Istio's proxy uid, so the uid-based capture bypass rules match ours. ztunnel's
# DaemonSet overrides it with root (it needs NET_ADMIN/SYS_ADMIN); istiod_lite and the
# waypoints run as this user.
RUN groupadd --system --gid 1337 ambient \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ambient
WORKDIR /
USER 1337:1337

ENTRYPOINT ["python", "-m"]
CMD ["istiod_lite", "--help"]
