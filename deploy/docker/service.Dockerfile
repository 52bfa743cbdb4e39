# One image recipe for every visearch service; SERVICE picks the process.
# Serving images carry no torch: models are built elsewhere (`visearch models build`)
# and served by Triton, or mounted read-only for the embedded ONNX Runtime backend.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY visearch ./visearch
COPY services ./services
RUN pip install --no-cache-dir --prefix=/install ".[server]"

FROM python:3.11-slim
ARG SERVICE
ENV SERVICE=${SERVICE} PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 visearch
USER visearch
CMD ["sh", "-c", "exec python -m services.${SERVICE}"]
