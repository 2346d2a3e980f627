"""Reference values for the real MNIST files, worked out by hand, never by the code under test (no tests here)."""

from __future__ import annotations

# What exports record as ``data_checksum`` for the real files, worked out by hand from the four published
# MD5s (docs/data.md) in file-name order: printf %s 9fb6...f3ec29...2cf68b...73d53e...32 | md5sum
MNIST_DATASET_CHECKSUM = "3f70b2b2867baa6c4887e29d5472ba76"
