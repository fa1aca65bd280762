# The two commands of the README:
#   make demo   set up (first time: ~2 min) and run the main job: the whole graph on embedded defaults
#   make test   set up and run the test suite (what .ci/run runs)
PY := .venv/bin/python
DEMO_SECONDS ?= 60

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m theia_ros.cli bringup config/sim_demo.yaml --duration $(DEMO_SECONDS)

test: setup
	$(PY) -m pytest -q test

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build build.log .venv
