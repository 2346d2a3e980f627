"""``python -m bench.gpu_check``: see bench/gpu_check/__init__.py and docs/gpu.md."""

from bench.gpu_check.check import main

raise SystemExit(main())
