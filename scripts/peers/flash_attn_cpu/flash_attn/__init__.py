"""A CPU stand-in for the `flash_attn` package, for running flash-attn based CP peers on CPU.

NOT flash-attn: every call runs PyTorch's CPU flash-attention op
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward) in flash-attn's
layouts and calling conventions, so a peer's own partition / communication / merge code
runs unchanged and every peer uses the same local kernel as torch SDPA on CPU.  Put on
`sys.path` only by `scripts.peers.standin.use_flash_attn_standin()`.

The version is >= 2.6.3 so that peers call the `window_size_left/right` API.
"""
__version__ = "2.7.4"
CPU_STANDIN = True

from .flash_attn_interface import flash_attn_func, flash_attn_varlen_func  # noqa: E402,F401
