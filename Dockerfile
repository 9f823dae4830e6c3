# One image for web and workers.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY esper_site esper_site
COPY urza urza
COPY tezzeret tezzeret
COPY tamiyo tamiyo
COPY kasmina kasmina
COPY manage.py ./
# The CPU build of torch: the CUDA one is several GB and the server does not need a GPU.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -e .
RUN useradd --create-home esper && mkdir -p /data/artifacts && chown -R esper /data
USER esper
EXPOSE 8000
CMD ["gunicorn", "esper_site.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
