"""An installed wheel (not editable) finds its configs and runs, from an unrelated folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _uv() -> str | None:
    return shutil.which("uv") or next(
        (str(p) for p in [REPO / ".tools" / "bin" / "uv"] if p.is_file()), None
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; the project's dependencies are reached
    through a path entry (a plain path line: the checkout's editable hook is not run)."""
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (make setup bootstraps it)")
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [uv, "build", "--wheel", "-o", str(root / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if built.returncode != 0 and "network" in built.stderr.lower():
        pytest.skip("the build backend could not be fetched")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("spineseg-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        [uv, "pip", "install", "--python", str(python), "--no-deps", str(wheel)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    (Path(purelib) / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def _run(env_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT")}
    env["SPINESEG_PROGRESS"] = "false"
    return subprocess.run(
        [str(env_dir / "bin" / args[0]), *args[1:]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_wheel_carries_its_configs_and_runs_anywhere(installed: Path, tmp_path: Path) -> None:
    where = _run(
        installed, tmp_path, "python", "-c", "import spineseg.config as c; print(c.CONF_DIR)"
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed)), where.stdout  # not the checkout's
    job = _run(installed, tmp_path, "spineseg-train", "--cfg", "job")
    assert job.returncode == 0, job.stderr[-2000:]
    assert "model:" in job.stdout and "unet_lite0" in job.stdout
    helped = _run(installed, tmp_path, "spineseg-predict", "--help")
    assert helped.returncode == 0 and "usage: spineseg-predict" in helped.stdout
    tiny = _run(installed, tmp_path, "spineseg-train", "experiment=tiny")
    assert tiny.returncode == 0, tiny.stderr[-3000:]
    manifest = tmp_path / "outputs" / "tiny" / "default" / "predictions" / "unet_lite0"
    assert (manifest / "manifest.json").is_file() and (manifest / "test.npz").is_file()
