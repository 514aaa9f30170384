"""Importing a peer's modules the way the benchmark needs them.

`submodule`: ring_flash_attn's `__init__` imports its Hugging Face adapter, which imports
transformers names that transformers 5 removed (`ImportError: cannot import name
'is_flash_attn_greater_or_equal_2_10'`); our dev extra needs transformers >= 5.  The
attention functions themselves never touch transformers, so the package is registered as
a bare namespace (its `__init__` is not run) and only the submodule asked for is imported.

`fp32fix_copy`: the ring backward of ring-flash-attn 0.1.8 and yunchang 0.6.4 starts its
float32 gradient accumulators as `dq = dq_buffer.to(torch.float32)`.  With float32 inputs
`.to()` returns the buffer itself, which the next block's backward overwrites, so fp32
gradients are wrong (the released peer is reported WRONG).  The copy, importable under
`<package>_fp32fix` beside the released one, has `.to(torch.float32, copy=True)` instead;
it is labelled `+fp32fix` and is not the released peer.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile

FIX_DIR = os.path.join(tempfile.gettempdir(), f"longctx-peers-fp32fix-{os.getuid()}")


def submodule(package: str, name: str, path: str | None = None):
    """Import `package.name` without running `package/__init__.py` (path: the package dir)."""
    if package not in sys.modules:
        spec = (importlib.util.find_spec(package) if path is None else importlib.util.spec_from_file_location(
            package, os.path.join(path, "__init__.py"), submodule_search_locations=[path]))
        sys.modules[package] = importlib.util.module_from_spec(spec)  # __init__ not executed
    return importlib.import_module(f"{package}.{name}")


def fp32fix_copy(package: str) -> tuple[str, str]:
    """(name, dir) of the patched copy of an installed package, written once per machine and
    package version (an upgraded peer gets a fresh copy, not the old one's)."""
    from importlib.metadata import version

    fixed = f"{package}_fp32fix"
    home = os.path.join(FIX_DIR, version(package.replace("_", "-")))
    dest = os.path.join(home, fixed)
    if not os.path.isdir(dest):
        src = importlib.util.find_spec(package).submodule_search_locations[0]
        os.makedirs(home, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=home)
        shutil.copytree(src, os.path.join(tmp, fixed), ignore=shutil.ignore_patterns("__pycache__"))
        for root, _, files in os.walk(os.path.join(tmp, fixed)):
            for f in files:
                if f.endswith(".py"):
                    p = os.path.join(root, f)
                    text = open(p).read()
                    text = re.sub(r"(\w+_buffer)\.to\(torch\.float32\)", r"\1.to(torch.float32, copy=True)", text)
                    text = re.sub(rf"\b(from|import) {package}\b", rf"\1 {fixed}", text)
                    open(p, "w").write(text)
        try:
            os.rename(os.path.join(tmp, fixed), dest)
        except OSError:  # another rank wrote it first: theirs is the same
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    if home not in sys.path:  # absolute imports inside the copy (yunchang) name `<package>_fp32fix`
        sys.path.append(home)
    return fixed, dest
