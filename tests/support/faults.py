"""Fault injection for the resilience tests: `python -m tests.support.faults --config ...` is `python -m train`
with InjectFaults put in front of the run's Trainer callbacks. Production code never imports this module.

  TRAIN_TEST_NAN_AT_STEP=k     the loss of optimizer step k (1-based) is multiplied by NaN in the
                               forward pass, so its gradients are NaN too (as after an fp16 overflow).
  TRAIN_TEST_ENOSPC_AT_SAVE=n  the n-th checkpoint save of this process writes half of optimizer.pt,
                               then fails with OSError(ENOSPC), as a disk that fills up mid-save does.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from train import trainer
from train.__main__ import main as train_main

NAN_AT_STEP = "TRAIN_TEST_NAN_AT_STEP"
ENOSPC_AT_SAVE = "TRAIN_TEST_ENOSPC_AT_SAVE"


class InjectFaults(TrainerCallback):
    """Must come before NonFiniteGuard in the callback list (its forward hook has to run first)."""

    def __init__(self):
        self.nan_step = int(os.environ.get(NAN_AT_STEP) or 0)
        self.enospc_save = int(os.environ.get(ENOSPC_AT_SAVE) or 0)
        self.step = 0
        self.saves = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.nan_step:
            model.register_forward_hook(self._poison_loss)
        if self.enospc_save:
            torch.save = self._failing_save(torch.save)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def _poison_loss(self, module, inputs, output):
        if module.training and self.step == self.nan_step and output.get("loss") is not None:
            output["loss"] = output["loss"] * float("nan")
        return output

    def _failing_save(self, real_save):
        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).name == "optimizer.pt":
                self.saves += 1
                if self.saves == self.enospc_save:
                    buf = io.BytesIO()
                    real_save(obj, buf, *args, **kwargs)
                    with open(f, "wb") as out:
                        out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *args, **kwargs)

        return save


def main(argv: list[str] | None = None) -> int:
    """`python -m train`, with InjectFaults first among the Trainer callbacks (before NonFiniteGuard)."""
    real = trainer.training_callbacks
    trainer.training_callbacks = lambda *a, **k: [InjectFaults(), *real(*a, **k)]
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
