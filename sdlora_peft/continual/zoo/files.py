"""Where the zoo keeps what it converts or renders, and how it finds the optional packages that carry its data."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "SDLORA_PEFT_CACHE"


def default_cache_dir() -> Path:
    """Where converted weights and rendered datasets are kept: ``$SDLORA_PEFT_CACHE`` or ``~/.cache/sdlora_peft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdlora_peft")


def require(module: str, pip_command: str) -> None:
    """Fail with the install command when an optional package is missing (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise _missing(module, pip_command)


def package_dir(module: str, pip_command: str) -> Path:
    """The installed folder of a package, found without importing it (some have heavy, uninstalled imports)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(module, pip_command)
    return Path(spec.submodule_search_locations[0])


def _missing(module: str, pip_command: str) -> ImportError:
    return ImportError(f"this needs the `{module}` package, which is not installed: {pip_command}")


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then rename it into place: concurrent or killed runs leave no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
