# The Ebbtide image: the operator (`python -m ebbtide_operator`, the chart's command)
# and the engine CLI (`ebbtide ...`), which the recovery Jobs run. One distribution,
# `ebbtide`, holds both. No QEMU or NBD client tools: the endpoint is an NBD server
# written in Python, and the image runs no NBD client. Not built in this repository's
# CI (no container runtime there): see docs/helm.md. Python 3.11 on Debian bookworm:
# the interpreter and Debian release the test suite runs on.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uid/gid as the chart's podSecurityContext (runAsUser/runAsGroup 10001).
RUN groupadd --system --gid 10001 ebbtide \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ebbtide --create-home \
        --shell /usr/sbin/nologin ebbtide

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY operator/ operator/
RUN pip install . && rm -rf /src

WORKDIR /var/lib/ebbtide
USER 10001:10001
# The chart sets command and args; this default runs the operator on all namespaces.
CMD ["python", "-m", "ebbtide_operator"]
