# neural_bone_reg developer entry points. `make demo` and `make test` set everything up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

# launch/ and config/ are folders: adding or removing a file there re-lays the venv's share/
# (the installed files are links, so edits to them are live without a new setup).
$(STAMP): setup.py setup.cfg package.xml scripts/setup_env.sh scripts/gen_tf2_msgs.sh \
		scripts/install_ament_layout.py launch config
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/neural-bone-reg demo $(if $(MESH),--mesh $(MESH)) $(if $(BAG),--bag $(BAG))

test: setup
	$(PY) -m pytest test $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/neural-bone-reg bench --data ../shared/data/ultrabones_hip --trials 10 \
		--json out/bench_ultrabones.json --plot out/bench_ultrabones.png

clean:
	rm -rf build install log out
