"""Compile a CPython extension from one C file on first use, cache it, load it.

The shared object lives in ``$MARLGRC_CACHE/native/<tag>/`` (default ``~/.cache/marlgrc``), where the
tag hashes the source, the shared header ``eventlog/_sha256.h`` and the interpreter's extension
suffix, so an edited source or header, or another Python, builds afresh. ``MARLGRC_NO_NATIVE=1`` turns every native module off (callers then use their
pure-Python definitions); ``CC`` picks the compiler.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

log = logging.getLogger(__name__)
# the headers any module may include (eventlog/_*.h: SHA-256 from libcrypto, numpy's array fields);
# all of them are part of every module's build tag
_HEADERS = Path(__file__).with_name("_sha256.h")


def build_extension(source: Path, name: str, *, purpose: str = "") -> ModuleType | None:
    """Compile (once per source version and Python) and load the module ``name`` from ``source``.

    Returns None when native code is turned off or no C compiler works; a warning names ``purpose``
    (e.g. "the verifier's fast path") so the reader knows what runs slower."""
    if os.environ.get("MARLGRC_NO_NATIVE"):
        return None
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    headers = b"".join(h.read_bytes() for h in sorted(_HEADERS.parent.glob("_*.h")))
    tag = hashlib.sha256(source.read_bytes() + headers + suffix.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MARLGRC_CACHE") or Path.home() / ".cache" / "marlgrc") / "native" / tag
    target = cache / (name + suffix)
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
            pass
        cmd = [cc, "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", f"-I{_HEADERS.parent}",
               str(source), "-o", tmp.name]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            os.unlink(tmp.name)
            detail = exc.stderr.decode(errors="replace").strip()[-400:] if getattr(exc, "stderr", None) else exc
            log.warning("cannot compile %s for %s (%s); using the pure-Python path", source.name,
                        purpose or name, detail)
            return None
        os.replace(tmp.name, target)  # atomic: concurrent builders agree
    spec = importlib.util.spec_from_file_location(name, target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sha256_functions() -> tuple[int, int, int]:
    """Addresses of the process's libcrypto ``SHA256_Init``, ``SHA256_Update`` and ``SHA256_Final``
    (the library hashlib uses), for C modules that hash in their loops: OpenSSL 3's one-shot
    ``SHA256()`` fetches an implementation on every call, which costs more than hashing an event."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    return tuple(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value
                 for f in ("SHA256_Init", "SHA256_Update", "SHA256_Final"))


def load_hashing_extension(source: Path, name: str, *, purpose: str,
                           configure: Callable[[ModuleType], None] | None = None) -> ModuleType | None:
    """``build_extension``, then hand the module libcrypto's SHA-256 (its ``set_sha256``) and
    ``configure`` it; None, with a warning naming ``purpose``, when any of that fails (callers then
    use their pure-Python definitions)."""
    try:
        mod = build_extension(source, name, purpose=purpose)
        if mod is not None:
            mod.set_sha256(*sha256_functions())
            if configure is not None:
                configure(mod)
        return mod
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the reference implementation
        log.warning("%s unavailable (%s); using the pure-Python path", purpose, exc)
        return None
