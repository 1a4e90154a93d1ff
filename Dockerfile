# Image for docker-compose.yml (api, router, render, beat, flower, migrate). For GPUs, build on a CUDA base
# and install the CUDA build of torch first (see README "GPU install").
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COPY pyproject.toml README.md ./
COPY nirvana nirvana
COPY api api
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir "torch==2.13.0" && pip install --no-cache-dir -e ".[s3]" flower
ENV NIRVANA_MIGRATIONS_DIR=/app/migrations
EXPOSE 8000 5555
