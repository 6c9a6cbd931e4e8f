# Two commands a user needs: `make demo` and `make test`. Both create .venv when missing.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test bench lint venv

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch==2.13.0 is the CPU build on this machine's disk; other specifiers pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# torch-fidelity: the test oracle for our FID InceptionV3, kept off the import path (.venv/oracles) and
	# without dependencies: it asks for torchvision, which must not be installed beside this torch
	$(PIP) install -q --no-deps --upgrade --target .venv/oracles "torch-fidelity==0.4.0"
	# k-diffusion: the samplers' oracle (A1111 runs its functions), likewise off the import path and without
	# dependencies: its package __init__ wants torchvision; the tests load k_diffusion.sampling alone
	$(PIP) install -q --no-deps --upgrade --target .venv/oracles "k-diffusion==0.1.1.post1"
	# spandrel: the upscaler nets' oracle (ESRGAN, Real-ESRGAN compact), off the import path and without
	# dependencies: its package __init__ wants torchvision; the tests load its ESRGAN and Compact modules alone
	$(PIP) install -q --no-deps --upgrade --target .venv/oracles "spandrel==0.4.2"
	# controlnet_aux: the annotators' oracle (lineart, OpenPose), off the import path and without dependencies:
	# its package __init__ imports every detector (torchvision, timm); the tests load its lineart and open_pose alone
	$(PIP) install -q --no-deps --upgrade --target .venv/oracles "controlnet-aux==0.0.10"
	touch $@

venv: .venv/.installed

demo: venv
	.venv/bin/sd info
	# the built-in model (trained by configs/builtin.toml), on the CPU, at its native 64x64
	rm -rf outputs/demo
	.venv/bin/sd txt2img "a small red circle at the top left on a white background" --seed 1 --out outputs/demo
	.venv/bin/sd txt2img "a blue square on the left and a yellow star on the right on a black background" \
		--seed 2 --out outputs/demo
	.venv/bin/sd pnginfo outputs/demo/00000-1.png
	# the built-in ControlNet: the shapes where examples/layout.png draws them (saved beside the layout as -control.png);
	# CFG only above sigma 5 (NGMS) keeps the caption's grid place and size from pulling the shapes off the layout
	.venv/bin/sd txt2img "a yellow star on the left and a red circle on the right on a navy background" \
		--control examples/layout.png --ngms 5 --ngms-all-steps --seed 3 --out outputs/demo

test: venv
	.venv/bin/ruff check .
	$(PY) -m pytest

bench: venv
	# SD1.5-size components and whole images, then SDXL's UNet at 1024 px (~7 min, 11 GB)
	$(PY) benchmarks/bench_components.py
	# exact and fast mode (openvino, int8, DeepCache, ToMe): a first run converts and quantizes (~30 min on 2 cores)
	$(PY) benchmarks/bench_fast.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_workers.py

lint: venv
	.venv/bin/ruff check .
