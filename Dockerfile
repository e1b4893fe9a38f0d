# ctharden image: the pipeline, the `ctharden` CLI and DVC on the embedded data.
#
#   CPU (default):  docker build -t ctharden .
#   CUDA:           docker build -t ctharden:cu128 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                   docker run --rm --gpus all ctharden:cu128
#
# Both variants use the same base: PyTorch's CUDA wheels bring the CUDA runtime, cuBLAS and cuDNN as
# pip packages (nvidia-*), so only the host's NVIDIA driver is needed, and `--gpus all` (NVIDIA
# Container Toolkit) provides it. An nvidia/cuda base would add a second copy of those libraries and
# has no Python 3.11. BASE_IMAGE must be a Debian image with Python 3.11 and pip.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The PyTorch wheel index of the variant: .../whl/cpu, .../whl/cu128, ...
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    PREFECT_HOME=/tmp/prefect \
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db
# MLFLOW_TRACKING_URI is relative on purpose: MLflow's database (and, from params.yaml, the mlruns/
# artifacts) land in the working directory, i.e. /app, or a checkout mounted with -v "$PWD":/work -w /work.
# PREFECT_HOME only holds the temporary local API's database of the flow run.

# git: DVC on a mounted checkout; make: the README's targets. Not version-pinned: Debian replaces
# package versions on security updates, so exact pins break rebuilds; the base tag fixes the release.
# /var/tmp/dvc is DVC's shared site cache; world-writable so any --user can run dvc.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash ctharden \
    && install -d -o ctharden -g ctharden /app \
    && install -d -m 1777 /var/tmp/dvc

WORKDIR /app

# 1. torch first, from the variant's PyTorch index (the default index would pull CUDA wheels for the
#    CPU image). --no-deps: its dependencies come from constraints.txt in step 2, as in `make install`.
RUN pip install --no-deps --index-url "${TORCH_INDEX}" torch==2.13.0

# 2. The project's dependencies with the pinned constraints (constraints.txt pins torch==2.13.0, which
#    the +cpu / +cu128 build from step 1 satisfies, so pip keeps it). Only pyproject.toml and
#    constraints.txt are copied so that this slow layer is rebuilt only when they change.
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The package itself: the Makefile's `pip install -c constraints.txt -e ".[dev]"` without the
#    editable mode and the dev extras. Then check that pip kept the variant's torch build.
COPY src ./src
RUN pip install -c constraints.txt . \
    && rm -rf build src/*.egg-info \
    && python -c "import sys, torch; want = '2.13.0+' + sys.argv[1].rstrip('/').rsplit('/', 1)[-1]; assert torch.__version__ == want, (torch.__version__, want)" "${TORCH_INDEX}"

# 4. The project (pipeline definition, params, flows, committed metrics, the in-repo DVC remote).
#    .dockerignore keeps out .git, the venv, run state and data/; data/ is fetched from dvc-store/
#    here. Without .git, DVC runs with core.no_scm (local config of this copy only).
#    1000:1000 is the user ctharden created above (numeric, so hosts and `--user` checks can resolve it).
COPY --chown=1000:1000 . /app
USER 1000:1000
RUN dvc config --local core.no_scm true \
    && dvc pull -q data.dvc

# Default: the whole pipeline as one Prefect flow on the embedded data (no server needed).
# Other commands: `docker run --rm ctharden ctharden --help`, `... dvc repro`, `... python flows/pipeline.py --profile smoke`.
CMD ["python", "flows/pipeline.py"]
