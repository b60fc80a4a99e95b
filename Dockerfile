# cnfgnn in a container: one image for the SuperLink, the SuperNodes and submitting a run
# (launch/compose.yaml, docs/deployment.md §3). UNTESTED: built without a Docker engine.
#
#   docker build -t cnfgnn:0.2.0 .
#
# Stage 1 builds the wheel from this checkout; stage 2 installs only the wheel (no source
# tree), CPU torch first so that pip never pulls a CUDA build.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY cnfgnn/ cnfgnn/
COPY conf/ conf/
COPY data/ data/
RUN pip install --no-cache-dir "setuptools>=77" wheel \
 && pip wheel --no-deps --no-build-isolation -w /dist .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install /tmp/dist/cnfgnn-*.whl && rm -rf /tmp/dist
# a non-root user, uid 49999 as in Flower's own images: mounted keys must be readable by it
RUN useradd --uid 49999 --create-home --home-dir /app app
USER app
WORKDIR /app
# owned by app: compose's named volume for the SuperLink's state starts as a copy of this
RUN mkdir -p /app/superlink /app/outputs
CMD ["cnfgnn-deploy", "--help"]
