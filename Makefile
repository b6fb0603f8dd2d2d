# rl4med-ddpo: `make demo` runs the embedded CPU demo, `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# the workflow's tools and scripts run from the venv; no model hub at run time
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: help setup demo sweep showcase methods pretrain-tiny test bench gpu-check dryrun lint clean

help:
	@echo "make demo    install into $(VENV) and run the embedded demo to results/report.html"
	@echo "make test    install into $(VENV) and run every test (includes a micro end-to-end run)"
	@echo "make sweep   the demo plus a 2-setting DDPO sweep (config/sweep.yaml), about 15 minutes more"
	@echo "make showcase  the CPU showcase (config/cpu-showcase.yaml, <= 90 min) -> docs/results/cpu-showcase.md"
	@echo "make methods  DDPO, AWM and DRaFT-K at equal reward queries on the showcase (<= 2 h) -> docs/results/cpu-methods.md"
	@echo "make pretrain-tiny  pre-train the tiny SD -> resources/tiny-sd-derm64 and -step750 (resumable; about 35 min on 2 idle CPU cores)"
	@echo "make bench   CPU benchmarks (ratios against bare baselines) -> benchmarks/results.md"
	@echo "make gpu-check  the GPU check (SD v1.5 speed, DDPO, GPU-hours, workflow devices) -> docs/results/gpu-check.md; no CUDA: results/gpu-check/"
	@echo "make dryrun  dry-run the demo and the paper-scale (ISIC2019) configs"
	@echo "make lint    ruff and snakemake --lint"

# torch and torchvision first, pinned: the installer takes both from this machine's disk, and
# an unpinned torch pulled in by another package would download other CUDA builds.
# INSTALLER=uv (default): uv, pip-installed into the venv first, unpacks torch's CUDA wheels in
# parallel: the whole install took 41 s instead of pip's 150 s on 2 cores (fresh venv and cache,
# bytecode compiled as pip does). uv does not read pip's configuration, so the indexes,
# find-links and constraints pip is configured with (`pip config list`) are handed to it, and
# it takes the best version over all indexes, as pip does. INSTALLER=pip: pip alone.
INSTALLER ?= uv
UV_VERSION := 0.13.9
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"
define UV_FROM_PIP
import ast, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint"}
pairs = []
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in flags and value:
        pairs += [(flags[name], v) for v in ast.literal_eval(value).split()]
print(" ".join(f"{flag} {v}" for flag, v in dict.fromkeys(pairs)))
endef
export UV_FROM_PIP

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && \
		$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"; then \
		uv_args="--python $(BIN)/python --compile-bytecode --index-strategy unsafe-best-match \
			$$($(BIN)/python -c "$$UV_FROM_PIP")"; \
		echo "uv pip install $$uv_args $(TORCH_PINS), then -e .[test]"; \
		$(BIN)/uv pip install -q $$uv_args $(TORCH_PINS); \
		$(BIN)/uv pip install -q $$uv_args -e ".[test]"; \
	else \
		[ "$(INSTALLER)" = pip ] || echo "uv $(UV_VERSION) could not be installed: pip installs" >&2; \
		echo "pip install $(TORCH_PINS), then -e .[test]"; \
		$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PINS); \
		$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"; \
	fi
	@touch $@

setup: $(STAMP)

demo: setup
	snakemake --cores $(CORES)
	snakemake --report results/report.html
	@echo "report: results/report.html"

# the CPU showcase: the whole workflow with a larger budget in its own folder (showcase/), then
# docs/results/cpu-showcase.md written from that run's outputs (python -m rl4med.showcase)
SHOWCASE ?= showcase
SHOWCASE_CONFIG := $(abspath config/cpu-showcase.yaml)
showcase: setup
	@mkdir -p $(SHOWCASE)
	start=$$(date +%s); \
	snakemake all results/metrics/stage_i_prompt_adherence.tsv --cores $(CORES) \
		-s $(abspath Snakefile) --directory $(SHOWCASE) --configfile $(SHOWCASE_CONFIG); \
	snakemake -s $(abspath Snakefile) --directory $(SHOWCASE) --configfile $(SHOWCASE_CONFIG) \
		--report $(abspath $(SHOWCASE))/results/report.html; \
	echo $$(( $$(date +%s) - start )) > $(SHOWCASE)/wall_seconds
	$(BIN)/python -m rl4med.showcase --run-dir $(SHOWCASE) --out-dir docs/results \
		--wall-seconds $$(cat $(SHOWCASE)/wall_seconds) --tuning docs/results/cpu-showcase-tuning.tsv \
		--labels docs/results/labels-by-eye.tsv
	@echo "showcase: docs/results/cpu-showcase.md, report: $(SHOWCASE)/results/report.html"

# stage ii's update rules compared at equal reward queries (issue 34): DDPO, AWM and DRaFT-K on
# the showcase's settings (config/cpu-methods.yaml), in their own folder (methods/), then
# docs/results/cpu-methods.md and cpu-methods-summary.tsv written from that run's outputs
METHODS ?= methods
METHODS_CONFIGS := $(abspath config/cpu-showcase.yaml) $(abspath config/cpu-methods.yaml)
methods: setup
	@mkdir -p $(METHODS)
	start=$$(date +%s); \
	snakemake results/methods/table.tsv --cores $(CORES) -s $(abspath Snakefile) \
		--directory $(METHODS) --configfile $(METHODS_CONFIGS); \
	echo $$(( $$(date +%s) - start )) > $(METHODS)/wall_seconds
	$(BIN)/python -m rl4med.showcase.methods --run-dir $(METHODS) --out-dir docs/results \
		--wall-seconds $$(cat $(METHODS)/wall_seconds)
	@echo "methods: docs/results/cpu-methods.md"

# the pretrained tiny SD that the demo's stage i fine-tunes (config/pretrain-tiny.yaml), with its
# model card: data -> stage i -> judge -> float16 export -> measurements -> resources/tiny-sd-derm64
# (and its step-750 checkpoint, a weaker start, -> resources/tiny-sd-derm64-step750).
# Every finished step is kept in results/pretrain-tiny and stage i resumes from its checkpoints,
# so a killed run continues. On a GPU when one is present; on 2 idle CPU cores about 35 min: run it
# in the background, e.g. `nohup nice -n 19 make pretrain-tiny > pretrain-tiny.log 2>&1 &`
pretrain-tiny: setup
	$(BIN)/python -m rl4med.tiny_sd.pretrain --config config/pretrain-tiny.yaml \
		--schema schemas/pretrain-tiny.schema.yaml

# pytest's exit code 5 (no tests collected) fails the target like any other failure
test: setup
	$(BIN)/python -m pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

# a DDPO hyper-parameter sweep on the demo (too long for `make demo`): config/sweep.yaml
sweep: setup
	snakemake --cores $(CORES) --configfile config.yaml config/sweep.yaml
	snakemake --configfile config.yaml config/sweep.yaml --report results/report.html
	@echo "sweep: results/sweep/table.tsv, report: results/report.html"

# speed goals: ratios against bare baselines measured in the same run (never timed tests)
bench: setup
	$(BIN)/python benchmarks/report.py

# one prepared check for a lent GPU (benchmarks/gpu_check.py says how to bring its packages):
# with any python that has them, no setup step (the GPU machine has no internet)
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

dryrun: setup
	snakemake -n --quiet rules
	snakemake -n --quiet rules --configfile config/isic2019-sd15.yaml

lint: setup
	$(BIN)/ruff check src scripts tests benchmarks
	snakemake --lint

clean:
	rm -rf results logs .snakemake
