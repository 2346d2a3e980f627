"""TorchServe as a peer of the project's REST server: the handler it serves the TorchScript export with.

``bench.torchserve_peer`` archives the export with ``mnist_handler.py`` and measures TorchServe beside the
project's server; docs/torchserve.md explains the comparison.
"""
