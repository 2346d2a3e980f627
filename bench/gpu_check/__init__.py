"""The GPU check: one command that a machine with an NVIDIA GPU runs as is (docs/gpu.md).

    python -m bench.gpu_check                   # make gpu-check; refuses where PyTorch sees no CUDA device
    python -m bench.gpu_check --allow-cpu       # no CUDA here: every part on the CPU, and every line says so

It trains one epoch of each framework, serves each export through the local stack's launcher with the
GPU settings (``settings.py``), load-tests each server at concurrency 1, 16 and 64, and prints for every
part the device it used (as observed, not as asked for), the batch sizes the servers formed, the figures
and the GPU memory a REST worker holds. Every part that runs in a framework runs in its own child
process (``child.py``), so PyTorch and TensorFlow never share a CUDA context and each one's device is
read where it ran. The result is ``<output-dir>/gpu_check.json``.

Modules: ``check`` (the command), ``settings`` (what runs on a GPU), ``child`` (the child processes'
entry points), ``observe`` (reading devices, batches and GPU memory from outside), ``lines`` (the output).
"""
