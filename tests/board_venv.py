"""A board's install for the slow install tests: a fresh venv with only `ROOT[extra]` (no
PyTorch), from pip's cache where the packages are there."""
import os
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def board_venv(where: Path, extra: str) -> Path:
    """The venv's bin folder, `pip install ".[extra]"` done in it (the test fails otherwise)."""
    venv.EnvBuilder(with_pip=True).create(where / "venv")
    bin_dir = where / "venv" / "bin"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    out = subprocess.run([str(bin_dir / "pip"), "install", "-q", f"{ROOT}[{extra}]"], cwd=where,
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return bin_dir
