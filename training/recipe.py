"""The training recipe both frameworks share, so their figures compare the frameworks, not two recipes.

Adam on a one-cycle learning-rate schedule (a short warm-up from lr/25 to the peak, then a cosine
decay to about 0, stepped per batch), batch 128. docs/training-torch.md has the accuracy and time
figures behind the default number of epochs.
"""

from __future__ import annotations

DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = {"adam": 3e-3, "sgd": 0.05}  # peak learning rate by optimizer

ONE_CYCLE_WARMUP = 0.15  # fraction of the steps spent warming up
ONE_CYCLE_DIV = 25.0  # the warm-up starts at peak / ONE_CYCLE_DIV (torch's OneCycleLR default)
ONE_CYCLE_FINAL_DIV = 1e4  # and the decay ends at that start / ONE_CYCLE_FINAL_DIV (likewise)
LR_SCHEDULE = "one-cycle (15% warm-up, cosine decay), per step"

# --quick, the same in both trainers: 1 epoch of 64 steps of 64 images on the first 4,096 training images,
# evaluated and exported on the first 1,000 test images (about 88-92% in seconds: enough for contract tests).
QUICK_TRAIN_EXAMPLES = 4096
QUICK_TEST_EXAMPLES = 1000
QUICK_DEFAULTS = {"epochs": 1, "batch_size": 64}  # defaults only: --epochs / --batch-size given still win
