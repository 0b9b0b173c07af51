# pneumoscan's web service on the base install (ONNX Runtime, no PyTorch): about 0.5 GB of Python packages.
#   docker build -t pneumoscan .
#   docker run --rm -p 8000:8000 pneumoscan                 # the bundled model; page at http://localhost:8000/
#   docker run --rm -p 8000:8000 -v "$PWD/bundle:/model:ro" pneumoscan --model /model
# Research software, not a medical device.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 pneumoscan
USER pneumoscan
WORKDIR /home/pneumoscan

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["pneumoscan", "serve", "--host", "0.0.0.0", "--port", "8000"]
