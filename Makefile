# devpipe — top-level entry points. See README.md.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps configure build demo test bench bench-mpi cuda-build format clean

all: build

deps:
	@bash scripts/install_deps.sh test

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVPIPE_TESTS=ON $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

# The demo needs neither GoogleTest nor PyTorch, and builds only the library and the demo.
demo:
	@bash scripts/install_deps.sh demo
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVPIPE_TESTS=OFF $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD_DIR) -j $(JOBS) --target vision_text_demo
	@$(BUILD_DIR)/examples/vision_text/vision_text_demo

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

bench: build
	@$(BUILD_DIR)/tools/devpipe bench --all --out $(BUILD_DIR)/bench/report.json
	@if [ -x $(BUILD_DIR)/tools/devpipe_mpi_bench ]; then $(RUN_BENCH_MPI); fi

# The benchmark's process mode (tp 2 as threads vs as 2 MPI processes, devpipe's collectives vs
# MPI's; bench/README.md), when devpipe is built with MPI. `make bench` runs it after the main
# bench when it is built.
MPIRUN ?= mpirun --oversubscribe --bind-to none $(if $(filter 0,$(shell id -u)),--allow-run-as-root)
RUN_BENCH_MPI = $(MPIRUN) -np 2 $(BUILD_DIR)/tools/devpipe_mpi_bench --out $(BUILD_DIR)/bench/mpi_report.json
bench-mpi: build
	@test -x $(BUILD_DIR)/tools/devpipe_mpi_bench || { echo "bench-mpi: devpipe was built without MPI (scripts/install_deps.sh installs Open MPI; reconfigure)"; exit 1; }
	@$(RUN_BENCH_MPI)

# Compiles and links the cuda backend (no GPU needed to build it).
cuda-build: deps
	@cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVPIPE_TESTS=ON -DDEVPIPE_CUDA=ON >/dev/null
	@cmake --build build-cuda -j $(JOBS)

format:
	@find include src tools examples tests bench -name '*.h' -o -name '*.cpp' -o -name '*.cu' | xargs clang-format -i

clean:
	@rm -rf $(BUILD_DIR) build-cuda

# Installs headers, library, CMake package and pkg-config file: make install PREFIX=/opt/devpipe
# (default: CMake's install prefix, /usr/local).
.PHONY: install check-consumer
install: build
	@cmake --install $(BUILD_DIR) $(if $(PREFIX),--prefix $(PREFIX))

# Installs to a temporary prefix and builds and runs tests/consumer against it (find_package
# and pkg-config).
check-consumer: build
	@bash scripts/check_consumer.sh $(BUILD_DIR)

# The whole suite under ASan + UBSan and the threaded tests under TSan, built with clang 14 in
# build-asan and build-tsan (scripts/sanitize.sh); the fuzzers of fuzz/, each for FUZZ_SECONDS
# (scripts/fuzz.sh). Both fail on any finding.
FUZZ_SECONDS ?= 300
.PHONY: sanitize fuzz

sanitize:
	@bash scripts/install_deps.sh sanitize
	@JOBS=$(JOBS) bash scripts/sanitize.sh

fuzz:
	@bash scripts/install_deps.sh sanitize
	@JOBS=$(JOBS) FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh
