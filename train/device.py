"""Where a run trains and with which attention kernel, decided once from the config and the machine.

model.device: cuda must fail fast when the driver cannot run this torch build: torch.cuda.is_available() only
returns False (with a warning), and the Trainer would then train the 2B model on the CPU for days.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import Config
from core.errors import RunError

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Placement:
    cuda: bool
    attn_implementation: str


def driver_version() -> str:
    """The NVIDIA kernel driver's version line, or why there is none."""
    if not NVIDIA_DRIVER_FILE.is_file():
        return f"no NVIDIA kernel driver loaded ({NVIDIA_DRIVER_FILE} is missing)"
    first = NVIDIA_DRIVER_FILE.read_text(errors="replace").splitlines()[0]
    return first.split("Kernel Module", 1)[-1].strip().split()[0] if "Kernel Module" in first else first.strip()


def cuda_problem() -> str | None:
    """What torch says when it initializes CUDA (driver too old, no device, ...); None when CUDA is usable."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build (install the CUDA wheels: pip install -c constraints.txt -e '.[cuda]')"
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as e:
        return str(e).strip().splitlines()[0]
    return None if torch.cuda.device_count() > 0 else "torch sees no CUDA device (CUDA_VISIBLE_DEVICES?)"


def placement(cfg: Config, for_card: bool = False) -> Placement:
    """Resolve model.device and model.attn_implementation; RunError (exit 2) when they cannot run here. for_card:
    the dry run's --gpu-memory plans for a GPU that need not be in this machine: CUDA is assumed."""
    wanted = cfg.model.device
    cuda = wanted != "cpu" and (for_card or torch.cuda.is_available())
    if wanted == "cuda" and not cuda:
        raise RunError(
            f"model.device is cuda but CUDA is unusable: {cuda_problem() or 'torch.cuda.is_available() is False'}; "
            f"torch {torch.__version__} is built for CUDA {torch.version.cuda or '(none)'}, "
            f"driver: {driver_version()}. "
            "Fix the driver or container runtime (nvidia-smi must work), or set model.device=cpu to train on the CPU."
        )
    attn = cfg.model.attn_implementation
    if attn == "auto":
        # flex_attention: the softcap inside the kernel, no T x T scores (docs/gpu-box.md); on CPU it has no backward
        attn = "flex_attention" if cuda else "eager"
    elif attn == "flex_attention" and not cuda:
        raise RunError(
            "model.attn_implementation: flex_attention cannot train on the CPU (torch has no FlexAttention backward "
            "there); use eager or auto on CPU"
        )
    return Placement(cuda=cuda, attn_implementation=attn)
