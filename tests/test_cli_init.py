"""`jobqd init`: the files the package ships, written out; and the built wheel, installed
outside the repository, doing it for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from jobqd.cli import SHARE_FILES, main
from jobqd.exitcodes import ExitCode

from .conftest import ROOT

SHARE = ROOT / "jobqd" / "share"


def test_shipped_copies_are_identical_to_the_repository_files() -> None:
    """jobqd/share/ is what the wheel carries; etc/ and systemd/ are what the docs point to.
    The share/ entries are symlinks to those files, so there is one copy to edit."""
    shipped = sorted(str(p.relative_to(SHARE)) for p in SHARE.rglob("*") if p.is_file())
    assert shipped == sorted(rel for rel, _ in SHARE_FILES)
    for rel, repo in SHARE_FILES:
        assert (SHARE / rel).read_bytes() == (ROOT / repo).read_bytes(), (
            f"jobqd/share/{rel} differs from {repo}: cp {repo} jobqd/share/{rel}")


def test_init_writes_the_files_and_never_overwrites_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "conf"
    assert main(["init", str(target)]) == 0
    out = capsys.readouterr().out
    for rel, repo in SHARE_FILES:
        assert (target / rel).read_bytes() == (ROOT / repo).read_bytes()
        assert f"wrote {target / rel}" in out
    assert f"jobqd -c {target / 'jobqd.yaml'} check-config" in out

    (target / "jobqd.yaml").write_text("# mine\n")
    (target / "grafana" / "jobqd-dashboard.json").unlink()
    assert main(["init", str(target)]) == ExitCode.ERROR
    out, err = capsys.readouterr()
    assert f"{target / 'jobqd.yaml'} exists" in err and "--force" in err
    assert (target / "jobqd.yaml").read_text() == "# mine\n"  # untouched
    assert not (target / "grafana" / "jobqd-dashboard.json").exists()  # nothing written
    assert out == ""

    assert main(["init", str(target), "--force"]) == 0
    assert (target / "jobqd.yaml").read_bytes() == (ROOT / "etc/jobqd.yaml").read_bytes()
    assert (target / "grafana" / "jobqd-dashboard.json").exists()


def test_init_defaults_to_the_current_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / "jobqd.yaml").exists() and (tmp_path / "systemd/jobqd.service").exists()


@pytest.mark.timeout(180)
def test_built_wheel_installed_outside_the_repo_runs_init_and_check_config(
        tmp_path: Path) -> None:
    """What a new user does: build the wheel, install it into a fresh venv, jobqd init.
    (Slow-ish: the dependencies come from pip's cache or PyPI.)"""
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "JOBQD_CONFIG", "VIRTUAL_ENV")}
    # build from a copy: a setuptools build/ left in the checkout can leak stale files
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench",
        "state"))
    # the build and the venv (ensurepip) do not depend on each other: side by side
    build_log = tmp_path / "build.log"
    with build_log.open("w") as out:
        build = subprocess.Popen([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                                  "-w", str(dist), str(src)], env=env, cwd=tmp_path,
                                 stdout=out, stderr=subprocess.STDOUT)
    venv_dir = tmp_path / "venv"
    try:
        venv.create(venv_dir, with_pip=True)
        build.wait(timeout=120)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert build.returncode == 0, build_log.read_text()
    [wheel] = dist.glob("jobqd-*.whl")
    py = venv_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True, env=env, cwd=tmp_path, timeout=150)
    jobqd = venv_dir / "bin" / "jobqd"
    work = tmp_path / "elsewhere"
    work.mkdir()
    conf = work / "conf"
    p = subprocess.run([str(jobqd), "init", str(conf)], env=env, cwd=work,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    for rel, repo in SHARE_FILES:
        assert (conf / rel).read_bytes() == (ROOT / repo).read_bytes(), rel
    p = subprocess.run([str(jobqd), "-c", str(conf / "jobqd.yaml"), "check-config"], env=env,
                       cwd=work, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"# {conf / 'jobqd.yaml'}: OK")
    # the installed package, not this checkout, answered
    p = subprocess.run([str(py), "-c", "import jobqd; print(jobqd.__file__)"], env=env,
                       cwd=work, capture_output=True, text=True, timeout=60, check=True)
    assert str(venv_dir) in p.stdout
