# The two commands a newcomer runs: `make test` and `make figures`. Both create the
# virtual environment on first use and install the package with the exact versions of
# constraints.txt (setup.cfg itself states compatible ranges).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast test-all lint typecheck derivations figures figures-quick bench calibrate clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,train]'
	touch $@

# The whole suite, lint and the type check: what CI runs.
test: lint typecheck test-all

# Two workers (pytest-xdist): the suite is CPU-bound, and two cores halve it.
test-all: $(STAMP)
	$(PY) -m pytest -n 2

# Every module, in seconds: no gate, nothing marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gate and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check propagation figures tests bench derivations

typecheck: $(STAMP)
	$(VENV)/bin/mypy

derivations: $(STAMP)
	$(PY) -m derivations

# --- figures: one script per figure; each writes <ID>.json, <ID>.pdf and, last, <ID>.png,
# the target. A figure is rebuilt when its script, the shared script code or the package
# changes, so a second `make figures` does nothing; `make -j2 figures` builds two at once.
PKG_SOURCES := $(wildcard propagation/*.py)
FIG_DEPS    := figures/_common.py $(PKG_SOURCES)
FIG_OUT     := figures/out
FIGURES     := F1 F2 F3 F4 F6
# Training experiments (propagation.train): each writes <ID>.json last. Finished runs are
# cached in $(FIG_OUT)/runs, so an interrupted `make figures` continues where it stopped.
TRAINING    := T1 F5 T2
TRAIN_DEPS  := figures/_training.py figures/f5_batch_lr.py $(FIG_DEPS)

# $(call figure_rules,ID,script): the full figure in $(FIG_OUT), the quick one in $(FIG_OUT)/quick.
define figure_rules
$(FIG_OUT)/$(1).png: $(2) $$(FIG_DEPS) | $$(STAMP)
	$$(PY) $(2) --out $(FIG_OUT)
$(FIG_OUT)/quick/$(1).png: $(2) $$(FIG_DEPS) | $$(STAMP)
	$$(PY) $(2) --quick --out $(FIG_OUT)/quick
endef
$(eval $(call figure_rules,F1,figures/f1_statistics.py))
$(eval $(call figure_rules,F2,figures/f2_sqrt_depth.py))
$(eval $(call figure_rules,F3,figures/f3_signal_propagation.py))
$(eval $(call figure_rules,F4,figures/f4_gradients.py))
$(eval $(call figure_rules,F6,figures/f6_transformers.py))

# $(call training_rules,ID,script,order-only prerequisites): full and quick, as figure_rules.
define training_rules
$(FIG_OUT)/$(1).json: $(2) $$(TRAIN_DEPS) | $$(STAMP) $(3:%=$(FIG_OUT)/%)
	$$(PY) $(2) --out $(FIG_OUT)
$(FIG_OUT)/quick/$(1).json: $(2) $$(TRAIN_DEPS) | $$(STAMP) $(3:%=$(FIG_OUT)/quick/%)
	$$(PY) $(2) --quick --out $(FIG_OUT)/quick
endef
$(eval $(call training_rules,T1,figures/t1_trainability.py))
$(eval $(call training_rules,F5,figures/f5_batch_lr.py))
# T2's BatchNorm and SkipInit runs are F5's: run after F5, they come from the cache.
$(eval $(call training_rules,T2,figures/t2_regularised.py,F5.json))

figures: $(FIGURES:%=$(FIG_OUT)/%.png) $(FIG_OUT)/agreement.md $(TRAINING:%=$(FIG_OUT)/%.json)

# The gate's agreement table (scheme x depth x quantity), from the gate's cases (propagation/gate.py).
$(FIG_OUT)/agreement.md: figures/agreement.py $(PKG_SOURCES) | $(STAMP)
	$(PY) figures/agreement.py --out $(FIG_OUT)

figures-quick: $(FIGURES:%=$(FIG_OUT)/quick/%.png) $(TRAINING:%=$(FIG_OUT)/quick/%.json)

clean:
	rm -rf figures/out .pytest_cache

bench: $(STAMP)
	$(PY) bench/run.py

# Coverage of the finite-width theory's 90% band, its medians, and the gate's sharpness
# (64 seeds, every MLP scheme, widths 64/128/256): bench/out/calibration.md, ~10 min on 2 cores.
calibrate: $(STAMP)
	$(PY) bench/calibrate.py --out bench/out
