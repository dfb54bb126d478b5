"""Every shell command the README (and docs/) shows runs as written, at tiny scale.

The commands of a document run in order, in one scratch folder, as a user would type them
after `make demo` and `source .venv/bin/activate`: the folders they name (`my_dataset`,
`siteA`, `new_films/`) exist there as small synthetic datasets, and outputs land there.
What changes is the scale only: overrides appended to each Hydra command shrink the films,
the epochs and the bootstrap (see `TINY`). A command that needs what CI lacks (a GPU, a
cluster, model hubs, or hours) is composed instead (`--cfg job`, or `make -n`), so a typo
in it still fails; `NEEDS` lists the words that mark such commands.

Runs in `.ci/run` as its own step (`make test-readme`), not in the default suite.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
pytestmark = pytest.mark.readme

#: The scale a command runs at here, appended after its own overrides (the last wins).
TINY = (
    "data.image_size=[64,64]",
    "data.batch_size=4",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "ensemble.n_boot=50",
)
#: ... and for the built-in phantoms, fewer films.
TINY_SYNTHETIC = ("data.source_kwargs.n=24", "data.external.source_kwargs.n=8")
#: Words that mark a command as needing what CI does not have: it is only composed.
NEEDS = {
    "a GPU": ("trainer=gpu", "trainer=ddp", "TRAINER=gpu"),
    "a cluster": ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm", "LAUNCHER=slurm"),
    "model hubs": ("sweep=paper20", "SWEEP=paper20"),
}
#: make targets that only dry-run here: hours of benchmarks, and a rewrite of the checkout.
MAKE_DRY = ("bench", "format")
#: Lines that set up the shell rather than run anything: the test's environment does it.
SHELL_SETUP = ("source .venv/bin/activate",)
HYDRA_APPS = ("spineseg-train", "spineseg-study", "spineseg-ensemble", "spineseg-validate-data")


def shell_commands(path: Path) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(shlex.join(words))
    return out


CASES = [(doc, cmd) for doc in DOCUMENTS for cmd in shell_commands(doc)]


def _needs(cmd: str) -> str | None:
    words = shlex.split(cmd)
    if words[0] == "make" and set(words[1:]) & set(MAKE_DRY):
        return "hours, or a rewrite of the checkout"
    for what, words in NEEDS.items():
        if any(w in cmd for w in words):
            return what
    return None


def _synthetic(words: list[str]) -> bool:
    return not any(
        (w.startswith("data=") and w != "data=synthetic") or w.startswith("DATA=") for w in words
    )


def _write_folder_dataset(root: Path, n: int, seed: int) -> None:
    """`n` phantoms as PNG films and Th8..Th11 region masks, `images/` and `masks/`."""
    import cv2

    from spineseg.data.sources import build_source
    from spineseg.labels import region_mask

    samples = build_source("synthetic", n=n, seed=seed, height=256, width=128)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in samples:
        film = (s.image / max(1, int(s.image.max())) * 255).astype(np.uint8)
        assert cv2.imwrite(str(root / "images" / f"{s.id}.png"), film)
        mask = region_mask(s.label).astype(np.uint8) * 255
        assert cv2.imwrite(str(root / "masks" / f"{s.id}.png"), mask)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The user's folder: their datasets and new films, named as the README names them."""
    root = tmp_path_factory.mktemp("user")
    for i, name in enumerate(("my_dataset", "siteA", "siteB")):
        _write_folder_dataset(root / name, 12, seed=10 + i)
    _write_folder_dataset(root / "films", 3, seed=20)
    (root / "films" / "images").rename(root / "new_films")
    return root


def _environment(workdir: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # what `source .venv/bin/activate` gives
    return {
        **os.environ,
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]),
        "SPINESEG_PROGRESS": "false",
        "SPINESEG_CACHE_DIR": str(workdir / ".cache"),
        "PROJECT_ROOT": str(workdir),
    }


def runnable(cmd: str, workdir: Path) -> tuple[list[str], Path]:
    """The command as it runs here, and the folder it runs in."""
    words = shlex.split(cmd)
    tiny = [*TINY, *(TINY_SYNTHETIC if _synthetic(words) else ())]
    needs = _needs(cmd)
    if words[0] == "make":
        target = [w for w in words[1:] if "=" not in w]
        dry = ["-n"] if needs else []
        extra = f"EXTRA={' '.join([*tiny, f'paths.root_dir={workdir}'])}"
        return ["make", "-C", str(REPO), *dry, *words[1:], extra], workdir if target else REPO
    if needs:  # composed only; Hydra composes one job, so a multirun flag goes
        return [*[w for w in words if w not in ("-m", "--multirun")], "--cfg", "job"], workdir
    if words[0] in ("spineseg-train", "spineseg-study"):
        return [*words, *tiny], workdir
    if words[0] == "spineseg-ensemble":
        return [*words, "ensemble.n_boot=50"], workdir
    return words, workdir


@pytest.mark.parametrize(("doc", "cmd"), CASES, ids=[f"{d.name}:{c[:60]}" for d, c in CASES])
def test_every_readme_command_runs(doc: Path, cmd: str, workdir: Path) -> None:
    if cmd in SHELL_SETUP:
        assert (REPO / ".venv" / "bin" / "activate").is_file()  # what it sources exists
        return
    if cmd.startswith("make test"):
        pytest.skip("the test suite itself (CI runs it as its own step)")
    words, cwd = runnable(cmd, workdir)
    res = subprocess.run(
        words, cwd=cwd, env=_environment(workdir), capture_output=True, text=True, timeout=900
    )
    shown = shlex.join(words)
    assert res.returncode == 0, f"{doc.name}: `{cmd}` failed as `{shown}`:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, f"{doc.name}: `{cmd}`:\n{res.stderr[-3000:]}"
    apps = [ln for ln in res.stdout.replace("\\\n", " ").splitlines() if "spineseg-" in ln]
    if words[0] == "make" and "-n" in words and apps:  # the dry run's command: compose it
        tail = shlex.split(apps[-1])
        app = next(i for i, w in enumerate(tail) if w.startswith("spineseg-"))
        job = [w for w in tail[app:] if w not in ("-m", "--multirun")]
        composed = subprocess.run(
            [*job, "--cfg", "job"], cwd=workdir, env=_environment(workdir),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert composed.returncode == 0, f"`{cmd}` does not compose:\n{composed.stderr[-3000:]}"


def test_the_readme_has_commands_and_none_is_misread() -> None:
    """The extraction itself: the quickstart is found, continuations are joined."""
    commands = shell_commands(REPO / "README.md")
    assert commands[:2] == ["make demo", "make test"]
    assert any(c.startswith("spineseg-train -m sweep=paper20 trainer=gpu") and
               "hydra.launcher.timeout_min=240" in c for c in commands)  # fmt: skip
    assert all(not c.startswith("#") for c in commands)
