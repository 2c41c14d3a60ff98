# Koala in a container: one image for every role (`koala pd`, `koala host`, `koala gateway`,
# `koala status`); the role is the command. See docs/deploying.md.
#
#   docker build -t koala .
#   docker run --rm koala --help
#
# Your application: build FROM this image and COPY it in (or mount it), then give its
# path to `koala host` (or KOALA_APP). The examples are copied in so the image runs as is.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# the package first: a change to an example does not reinstall the dependencies
COPY pyproject.toml README.md ./
COPY koala ./koala
RUN pip install '.[uvloop]'

COPY examples ./examples

# no root inside the container; a fixed uid so mounted volumes can be given to it. The
# code stays root's (read-only to the server); /data is the one place it may write
# (e.g. KOALA_STORAGE_URL=sqlite:////data/state.db for examples/player_state.py)
RUN useradd --system --uid 10001 --home-dir /data --create-home koala
USER koala

# every listener binds loopback unless told otherwise (and then needs
# KOALA_CLUSTER_SECRET, or KOALA_GATEWAY_KEY for a gateway): see docs/security.md
ENTRYPOINT ["koala"]
CMD ["--help"]
