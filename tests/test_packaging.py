"""The package as a user installs it: the wheel's contents, and installed names that a user's own
``tasks.py`` or ``flows.py`` in the working folder cannot shadow."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: repo folder -> the installed package it becomes (pyproject.toml's package-dir)
MAPPING = {"slide_clip": "slide_clip", "flows": "slide_clip_flows", "tasks": "slide_clip_tasks",
           "configs": "slide_clip_configs"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the sources (no stale build/ folder can leak in)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in MAPPING:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [whl] = dist.glob("slide_clip-*.whl")
    return whl


def _expected_files() -> set[str]:
    """Every module of the repo's packages and every shipped config file, under installed names."""
    want = set()
    for folder, package in MAPPING.items():
        root = REPO / folder
        patterns = ("*.py", "*.yaml", "*.yml", "*.json") if folder == "configs" else \
            ("*.py", "viewer/static/*") if folder == "slide_clip" else ("*.py",)
        for pattern in patterns:
            for f in root.rglob(pattern):
                if "__pycache__" not in f.parts:
                    want.add(f"{package}/{f.relative_to(root).as_posix()}")
    return want


def test_wheel_holds_every_module_and_config_under_installed_names(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if ".dist-info/" not in n]
        top_level = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/top_level.txt"))).decode()
        entry_points = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    want = _expected_files()
    # sanity: the repo walk itself found what we know is there
    assert {"slide_clip/cli.py", "slide_clip_flows/cli.py", "slide_clip_tasks/products.py",
            "slide_clip_configs/default.yaml", "slide_clip_configs/models.yaml",
            "slide_clip_configs/prompts/tumour.yaml"} <= want
    missing = sorted(want - set(names))
    assert not missing, f"not in the wheel (add to pyproject.toml packages/package-data): {missing}"
    extra = sorted(n for n in names if n.endswith((".py", ".yaml", ".yml", ".json")) and n not in want)
    assert not extra, f"in the wheel but not in the repo: {extra}"
    # no top-level package named like a user's own module
    tops = {n.split("/")[0] for n in names}
    assert tops == set(MAPPING.values())
    assert set(top_level.split()) == set(MAPPING.values())
    assert "slide-clip = slide_clip_flows.cli:main" in entry_points


def _stray_modules(folder: Path) -> None:
    """An invoke-style tasks.py and a flows.py, as a user's project folder might hold."""
    (folder / "tasks.py").write_text("raise RuntimeError('the user tasks.py was imported by slide-clip')\n")
    (folder / "flows.py").write_text("raise RuntimeError('the user flows.py was imported by slide-clip')\n")


def test_stray_tasks_py_does_not_break_the_python_api(tmp_path, make_slide):
    slide, _ = make_slide("stray", width_um=700, height_um=500)
    work = tmp_path / "project"
    work.mkdir()
    _stray_modules(work)
    # Python started in that folder puts it first on sys.path, as `python -c` and notebooks do.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    code = ("import sys; assert sys.path[0] in ('', '.'), sys.path[0]; "
            "import slide_clip_flows.process_cohort, slide_clip_tasks.products, slide_clip as sc; "
            "from slide_clip.config import load_config; "
            f"print(sc.slide_info({str(slide)!r}).name, load_config().tiling.min_tissue)")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["stray", "0.25"]
    # and the control: that folder does shadow a plain `import tasks`
    r = subprocess.run([sys.executable, "-c", "import tasks"], cwd=work, capture_output=True, text=True, env=env)
    assert "the user tasks.py was imported" in r.stderr
    # `slide-clip run` from such a folder: tests/test_orchestration.py::test_run_options_closing_lines_and_cohort_tables
