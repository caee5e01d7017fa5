# The two commands of the README: `make demo` (set up + main job) and `make test`.
# Both create .venv on first use and install everything, torch pinned to the local CPU build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SHAPES  ?= ../shared/data/shapes

.PHONY: setup demo test lint clean packaged-model

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# open3d's wheel links libusb-1.0; Debian ships it as libusb-1.0-0.
	@if ! ldconfig -p | grep -q libusb-1.0.so.0; then \
	  echo "installing Debian's libusb-1.0-0 (open3d needs it)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	fi
	@# btp watch is tested against a real MQTT broker and a real PostgreSQL server: Debian's
	@# mosquitto and postgresql (tests/test_watch.py starts its own, on free loopback ports)
	@if { ! command -v mosquitto && [ ! -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || \
	    ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing Debian's mosquitto and postgresql (the tests' broker and database)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto postgresql >/dev/null; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, pinned: any other torch spec pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,test,corpus,serve,line]'
	@# Triton's server binary comes with PyPI's nvidia-pytriton, which pins numpy<2: its own venv
	test -x .venv-triton/bin/python || $(PY) -m venv .venv-triton
	.venv-triton/bin/python -m pip install -q nvidia-pytriton==0.7.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/btp demo

test: $(STAMP)
	BTP_SHAPES=$(SHAPES) $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The default model's ONNX that the package carries, exported from the weights beside it. Run it after
# retraining or when the export changes (tests/test_package_data.py fails then). The graph is
# deterministic and exported_at is the weights' commit time, so a rerun gives the same bytes.
MODEL_DIR := btp/assets/models
packaged-model: $(STAMP)
	name=$$($(BIN)/python -c "from btp.config import DEFAULT_MODEL_NAME as n; print(n)") && \
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%at -- $(MODEL_DIR)/$$name.safetensors) \
	  $(BIN)/btp-export --model $(MODEL_DIR)/$$name.safetensors --out $(MODEL_DIR)/$$name.onnx

clean:
	rm -rf $(VENV) .venv-triton build dist *.egg-info .pytest_cache .ci-wheel
