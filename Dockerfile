# One image for the API, the workers and the one-shot jobs (migrate, dataset). torch 2.14.1 from PyPI is a CUDA
# build: the workers use the GPU through the NVIDIA container toolkit; the API never imports torch.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir cape service worker && touch cape/__init__.py service/__init__.py worker/__init__.py \
    && pip install -e . && rm -rf cape service worker
COPY alembic.ini ./
COPY migrations migrations
COPY cape cape
COPY service service
COPY worker worker

RUN useradd --create-home --uid 1000 cape && mkdir -p /data /artifacts /torch /work /crops && chown cape /data /artifacts /torch /work /crops
USER cape
EXPOSE 8000
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]
