# ctharden CPU image. Build: docker build -t ctharden .   Run: docker run --rm ctharden --help
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 MLFLOW_TRACKING_URI=sqlite:////app/mlflow.db PREFECT_HOME=/app/.prefect
# CPU build of torch from the PyTorch index (the default index would pull CUDA wheels).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install -c constraints.txt .
COPY . .
ENTRYPOINT ["ctharden"]
CMD ["--help"]
