"""Make `import flash_attn` find the CPU stand-in (scripts/peers/flash_attn_cpu), for peers
built on flash-attn (ring-flash-attn, yunchang) when the real package cannot run here."""
from __future__ import annotations

import os
import sys

STANDIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attn_cpu")


def use_flash_attn_standin() -> str:
    """Put the stand-in first on sys.path (idempotent) and return what `flash_attn` now is.

    Raises ValueError when a real flash_attn was imported already (the two cannot mix)."""
    loaded = sys.modules.get("flash_attn")
    if loaded is not None and not getattr(loaded, "CPU_STANDIN", False):
        raise ValueError("the real flash_attn is already imported; the CPU stand-in cannot replace it in this process")
    if STANDIN_DIR not in sys.path:
        sys.path.insert(0, STANDIN_DIR)
    import flash_attn

    return f"flash_attn CPU stand-in {flash_attn.__version__} (torch's CPU flash-attention op)"
