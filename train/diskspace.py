"""Disk space: a preflight estimate of what a run and its export will write, checked per file system (outputs/ and
models/ are often separate Docker volumes), and full-disk diagnosis. An upper bound on what the run adds, plus 10%,
not on the peak: files already present (a resumed run's checkpoints) are not subtracted.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from convert.reference import SCRATCH_BUDGET
from core.config import Config
from core.errors import DiskSpaceError
from core.files import human_size
from core.quants import QUANTS, float_gguf_type
from core.runfolder import RunFolder

MARGIN = 1.10

# A failure during a save is blamed on a full disk when fewer bytes than this remain free: torch.save
# reports ENOSPC only as "unexpected pos ..." from its zip writer, without an errno.
FULL_BELOW = 1 << 20


@dataclass
class Write:
    what: str
    path: Path
    size: int


@dataclass
class TensorCounts:
    params: int
    embedding_params: int
    safetensors_bytes: int


def tensor_counts(model_dir: Path) -> TensorCounts:
    """Parameter counts from the safetensors headers, without loading any weight."""
    params = embedding = size = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        size += f.stat().st_size
        with safe_open(f, framework="numpy") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                numel = math.prod(st.get_slice(name).get_shape())
                params += numel
                if "embed_tokens" in name:
                    embedding += numel
    return TensorCounts(params, embedding, size)


def gguf_bytes(counts: TensorCounts, quant: str, token_embedding_type: str | None) -> int:
    bits = counts.params * QUANTS[quant].bits_per_weight
    if token_embedding_type and not QUANTS[quant].is_float:
        extra = QUANTS[token_embedding_type].bits_per_weight - QUANTS[quant].bits_per_weight
        bits += counts.embedding_params * max(0.0, extra)
    return int(bits / 8)


def planned_writes(
    cfg: Config, paths: RunFolder, base_dir: Path, trainable_bytes: int, total_steps: int, evaluating: bool
) -> list[Write]:
    run_root = paths.root
    tokenizer_files = [p for p in base_dir.iterdir() if p.name.startswith("tokenizer") or p.name.endswith(".jinja")]
    tok = sum(p.stat().st_size for p in tokenizer_files if p.is_file())
    per_checkpoint = 3 * trainable_bytes + tok + (64 << 10)  # adapter + AdamW's two moments, tokenizer, state files
    n = math.ceil(total_steps / cfg.training.save_steps) + 1  # + the final save
    if cfg.training.save_total_limit is not None:
        # the new checkpoint is committed before retention removes the oldest; the best one is kept too
        n = min(n, cfg.training.save_total_limit + 1 + (1 if evaluating else 0))
    writes = [
        Write(f"checkpoints ({n} x {human_size(per_checkpoint)})", run_root / "checkpoints", n * per_checkpoint),
        Write("adapter", run_root / "adapter", trainable_bytes + tok),
        Write("promoted adapter", paths.adapter_out, trainable_bytes + tok),
    ]
    if not cfg.export.enabled:
        return writes
    counts = tensor_counts(base_dir)
    exports = 2 if cfg.export.export_base else 1
    gguf_dir = Path(cfg.export.gguf_dir)
    quants = sum(gguf_bytes(counts, q, cfg.export.token_embedding_type) for q in cfg.export.quants)
    writes.append(Write("merged model", paths.merged_out, counts.safetensors_bytes + tok))  # in the base's dtype
    float_type = float_gguf_type(cfg.export.float_type, cfg.export.quants, base_dir)
    if float_type not in cfg.export.quants:  # converted first, deleted after verification unless export.keep_float
        kept = exports if cfg.export.keep_float else 1
        writes.append(
            Write(f"{float_type} GGUF (intermediate)", run_root / "export", kept * gguf_bytes(counts, float_type, None))
        )
    writes.append(Write(f"{exports * len(cfg.export.quants)} GGUF file(s)", gguf_dir, exports * quants))
    config = base_dir / "config.json"
    vocab = int(json.loads(config.read_text()).get("vocab_size") or 0) if config.is_file() else 0
    scratch = min(SCRATCH_BUDGET, cfg.verify.min_scored_tokens * vocab * 4)  # the reference's fp32 logits, unnamed
    writes.append(Write("verification scratch (reference logits)", run_root / "export", scratch))
    if _device(run_root) != _device(gguf_dir):  # quantized files are written in the run folder, then copied
        writes.append(Write("GGUF staging", run_root / "export", quants))
    return writes


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _device(path: Path) -> int:
    return _existing(path).stat().st_dev


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def check_free_space(writes: list[Write], free=free_bytes) -> str:
    """Raise DiskSpaceError if any file system lacks room for what will be written there; else a summary."""
    by_device: dict[int, list[Write]] = {}
    for w in writes:
        by_device.setdefault(_device(w.path), []).append(w)
    lines, problems = [], []
    for group in by_device.values():
        need = int(sum(w.size for w in group) * MARGIN)
        have = free(group[0].path)
        where = _existing(group[0].path)
        detail = ", ".join(f"{w.what} {human_size(w.size)}" for w in group)
        lines.append(f"{human_size(need)} of {human_size(have)} free at {where}")
        if need > have:
            problems.append(
                f"  {where}: needs about {human_size(need)} ({need} bytes: {detail}; +10%), "
                f"{human_size(have)} ({have} bytes) free"
            )
    if problems:
        raise DiskSpaceError(
            "not enough free disk space for this run:\n" + "\n".join(problems) + "\n"
            "  fix: free space or point paths.output_dir / paths.models_dir / export.gguf_dir at a larger "
            "volume; a lower training.save_total_limit or fewer export.quants write less; "
            "paths.check_free_space=false skips this check"
        )
    return "disk: the run will write about " + "; ".join(lines)


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether exc (or what caused it) is a full disk or quota, or the disk at folder is now full."""
    seen: BaseException | None = exc
    visited = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(folder) < FULL_BELOW
    except OSError:
        return False


def preflight(cfg: Config, paths: RunFolder, base_dir: Path, model, n_examples: int, evaluating: bool) -> str | None:
    """The run's disk check (None when paths.check_free_space is off); raises DiskSpaceError."""
    if not cfg.paths.check_free_space:
        return None
    t = cfg.training
    per_epoch = math.ceil(n_examples / (t.per_device_train_batch_size * t.gradient_accumulation_steps))
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return check_free_space(planned_writes(cfg, paths, base_dir, trainable, steps, evaluating))
