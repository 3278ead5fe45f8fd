# One entry point for a fresh machine: `make test` and `make demo` build .venv on first use, then reuse it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: test demo env lint bench weights distill clean-env

env: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# learn2learn needs torch present and a source rebuild on Python 3.11 (scripts/install_learn2learn.sh).
$(VENV)/.learn2learn: $(PY) constraints.txt scripts/install_learn2learn.sh
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	bash scripts/install_learn2learn.sh $(PY)
	touch $@

# The device extra (ExecuTorch, NCNN: ~0.5 GB, 30 s) is installed too, so that tests cover every export format.
$(INSTALLED): $(VENV)/.learn2learn pyproject.toml
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,plots,device,teachers]"
	touch $@

# timm's own tests/test_models.py for the installed timm (from its sdist): tests/test_timm_contract.py runs it.
$(VENV)/timm-tests/.fetched: $(INSTALLED) scripts/fetch_timm_tests.sh
	bash scripts/fetch_timm_tests.sh $(PY) $(VENV)/timm-tests
	touch $@

test: $(INSTALLED) $(VENV)/timm-tests/.fetched
	$(PY) -m pytest -q

demo: $(INSTALLED)
	$(PY) -m fewshot_lkca.finetune --overwrite

# The shipped starting point, from random initialisation (about 45 minutes on 2 CPU cores; see its model card).
weights: $(INSTALLED)
	$(PY) -m fewshot_lkca.pretrain --recipe pretrain_lookalike --out runs/shipped-lookalike --overwrite --no-progress
	$(PY) -m fewshot_lkca.weights.ship runs/shipped-lookalike

# The shipped photo starting point (fewshot_lkca/weights/lkca_mobilenet-photos.md): the transplant of ImageNet
# MobileNetV3-Small distilled from that network on offline photos (Debian packages, fetched by the script). The source
# weights are timm's tf_mobilenetv3_small_100.in1k state_dict: MNV3_WEIGHTS=PATH, else ../shared's copy, else timm's hub.
# A killed run resumes where it stopped.
MNV3_WEIGHTS ?= $(wildcard ../shared/weights/tf_mobilenetv3_small_100.in1k.pth)
DISTILL_RUN := runs/distill-photos
distill: $(INSTALLED)
	bash scripts/fetch_distill_images.sh data/distill-images
	if [ -f $(DISTILL_RUN)/train_state.pt ]; then $(PY) -m fewshot_lkca.pretrain --resume $(DISTILL_RUN) --no-progress; \
	else $(PY) -m fewshot_lkca.pretrain --recipe pretrain_distill_imagenet --weights $(or $(MNV3_WEIGHTS),imagenet) \
	  --teacher_weights=$(MNV3_WEIGHTS) --out $(DISTILL_RUN) --overwrite --no-progress; fi
	$(PY) -m fewshot_lkca.weights.ship $(DISTILL_RUN) --data photos

# Benchmarks print Markdown tables for the README (minutes each; see README "Evidence").
bench: $(INSTALLED)
	$(PY) -m benchmarks.backbones --onnx --out benchmarks/results/backbones.json
	$(PY) -m benchmarks.feature_survival

lint: $(INSTALLED)
	$(VENV)/bin/ruff check fewshot_lkca tests benchmarks

clean-env:
	rm -rf $(VENV)
