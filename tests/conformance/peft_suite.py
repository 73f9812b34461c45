"""PEFT's own generic test matrices, taken from the source distribution of the installed peft release.

The sdist carries `tests/` (testing_common.py, test_custom_models.py, test_decoder_models.py, ...); the wheel does
not. It is downloaded once into `.cache/peft-tests/` (ignored by git) and imported as the package `peft_tests`, so
its relative imports (`from .testing_common import ...`) work without touching our own `tests` package.

Run `python tests/conformance/peft_suite.py` to fetch it ahead of a parallel pytest run (`make conformance` does).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "peft-tests"
PACKAGE = "peft_tests"


def peft_version() -> str:
    return importlib.metadata.version("peft")


def peft_tests_dir() -> Path:
    """The `tests/` folder of the installed peft's sdist, downloaded on first use."""
    version = peft_version()
    tests = CACHE / f"peft-{version}" / "tests"
    if not (tests / "testing_common.py").is_file():
        _download(version)
    return tests


def _download(version: str) -> None:
    """pip's own download of the sdist; only its tests/ is kept. The folder appears in one rename, so an interrupted
    download leaves nothing half-extracted under its final name (and two processes racing both end up with it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"peft=={version}", "--dest", scratch], check=True)
        archive = next(Path(scratch).glob(f"peft-{version}.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{version}/tests/")]
            tar.extractall(scratch, members=members, filter="data")
        try:
            os.replace(Path(scratch) / f"peft-{version}", CACHE / f"peft-{version}")
        except OSError:
            if not (CACHE / f"peft-{version}" / "tests" / "testing_common.py").is_file():
                raise


def import_peft_tests(module: str) -> types.ModuleType:
    """Import one of PEFT's test modules, e.g. `import_peft_tests("test_custom_models")`."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(peft_tests_dir())]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")


if __name__ == "__main__":
    print(peft_tests_dir())
