# One virtual environment per megatron-core version. `make demo` and `make test` work on a fresh
# machine that has only Python 3.11+ and pip.
PYTHON ?= python3
VENV ?= .venv
VENV19 ?= .venv-mcore019
PYTEST_ARGS ?=
# torch is installed first and pinned, so nothing later pulls another build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast test-mcore019 test-long ci clean megatron-lm-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/folding train

test: install
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The inner loop: every test that spawns no ranks and is not slow, plus the smoke runs (a wheel
# that trains two steps from another folder, a 4-rank verify, a gloo collective).
test-fast: install
	$(VENV)/bin/python -m pytest -q -m "(not multiprocess and not slow) or smoke" $(PYTEST_ARGS)

# megatron-core 0.19.x declares Python >= 3.12; on 3.11 it installs without its metadata checks,
# with what it needs added by hand (its MoE package imports triton, which imports without a GPU).
$(VENV19)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV19)
	$(VENV19)/bin/pip install -q --upgrade pip
	$(VENV19)/bin/pip install -q $(TORCH)
	$(VENV19)/bin/pip install -q numpy scipy pyyaml matplotlib tqdm psutil packaging einops triton pytest pytest-timeout
	$(VENV19)/bin/pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	$(VENV19)/bin/pip install -q --no-deps -e .
	touch $@

test-mcore019: $(VENV19)/.installed
	$(VENV19)/bin/python -m pytest -q -m "megatron and not primary_only" $(PYTEST_ARGS)

ci: test test-mcore019

# The "Done when" cases too slow for CI on 2 cores: Megatron's training loop on 8 CPU ranks and
# with every CP comm type, the whole context-parallel verify matrix, expert re-placement during
# training (exact, resumed, 60 steps, paying against the contiguous layout) in folding train and
# in Megatron's loop with the distributed optimizer, the planner's leave-one-out calibration, and
# folding train's resume at full length (20 + 20 steps under four foldings).
test-long: $(VENV)/.installed $(VENV19)/.installed
	FOLDING_LONG_TESTS=1 $(VENV19)/bin/python -m pytest -q tests/test_megatron_loop.py -k "8_ranks or context_parallel_trains" $(PYTEST_ARGS)
	FOLDING_LONG_TESTS=1 $(VENV19)/bin/python -m pytest -q tests/test_verify_context_parallel.py $(PYTEST_ARGS)
	FOLDING_LONG_TESTS=1 $(VENV19)/bin/python -m pytest -q tests/test_replacement.py -k "sixty_steps or exactly_and_resumes or pays_against" $(PYTEST_ARGS)
	FOLDING_LONG_TESTS=1 $(VENV19)/bin/python -m pytest -q tests/test_megatron_replacement.py $(PYTEST_ARGS)
	FOLDING_LONG_TESTS=1 $(VENV)/bin/python -m pytest -q tests/test_calibrate.py $(PYTEST_ARGS)
	FOLDING_LONG_TESTS=1 $(VENV)/bin/python -m pytest -q tests/test_train.py -k twenty_steps $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV19)

# Megatron-LM's own pretrain_gpt.py (core_v0.16.1, core_v0.19.0, main) through `folding megatron`
# on CPU, unmodified and patched, against the stock script: needs MEGATRON_LM_GIT=/path/to/Megatron-LM/.git
# (its sources are not on PyPI, so CI cannot run this).
megatron-lm-check: $(VENV19)/.installed
	$(VENV19)/bin/pip install -q six regex pydantic
	$(VENV19)/bin/python -m pytest -q tests/test_megatron_lm_scripts.py tests/test_megatron_plugin.py -k "pretrain_gpt or applies" $(PYTEST_ARGS)
