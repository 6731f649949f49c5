"""scripts/install-gpu-offline.sh install: from a folder of wheels alone, torch never touched.

The "GPU machine" is a fresh venv whose Python already sees this environment's CPU torch (one .pth
line to its site-packages, as --system-site-packages shows a machine's own torch): the script installs
into the venv and must leave that torch as it is. The folder holds small wheels written here, whose
names exist in no index, and the two lists the download step writes. The download step itself needs
PyPI and 1.4 GB; it was run by hand (docs/gpu.md).
"""

import base64
import hashlib
import os
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-gpu-offline.sh"
SITE = Path(torch.__file__).resolve().parents[1]  # where this environment's torch lives
TORCH = torch.__version__.split("+")[0]


def _wheel(folder: Path, name: str, version: str, requires=(), files=None) -> None:
    """A pure-Python wheel as a build backend writes it: METADATA, WHEEL, RECORD with hashes."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = dict(files or {f"{name.replace('-', '_')}/__init__.py": f"VERSION = {version!r}\n"})
    files[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    files[f"{dist}.dist-info/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def _lists(folder: Path, stack: list[str], vllm: list[str] | None, vllm_torch: str = "0.0.1") -> None:
    """requirements.txt and requirements-vllm.txt in the download step's format (line 1 names the torch)."""
    header = "# resolved for torch=={}, Python 3.12, manylinux glibc 2.35 by install-gpu-offline.sh\n"
    (folder / "requirements.txt").write_text(header.format(TORCH) + "".join(f"{r}\n" for r in stack))
    if vllm is not None:
        (folder / "requirements-vllm.txt").write_text(header.format(vllm_torch) + "".join(f"{r}\n" for r in vllm))


@pytest.fixture
def machine(tmp_path) -> Path:
    """A venv that sees this environment's torch but installs into its own site-packages."""
    target = tmp_path / "machine"
    venv.create(target, with_pip=False)  # pip, like torch, is seen through the .pth line
    (next(target.glob("lib/python*/site-packages")) / "machine.pth").write_text(f"{SITE}\n")
    return target


def _install(folder: Path, target: Path) -> subprocess.CompletedProcess:
    # The machine's environment: without the tests' PYTHONPATH (the CPU stand-ins are not on a GPU machine).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        ["bash", str(SCRIPT), "install", str(folder), "--venv", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _torch_files() -> dict[str, float]:
    """mtime of torch's package and metadata files: an install that touched torch changes them."""
    dist_info = next(SITE.glob(f"torch-{torch.__version__}.dist-info"))
    return {str(p): p.stat().st_mtime_ns for p in [SITE / "torch" / "__init__.py", *dist_info.iterdir()]}


def _imports(target: Path, *modules: str) -> list[str]:
    code = "import importlib.util as u; print(*[u.find_spec(m).origin if u.find_spec(m) else None for m in {!r}])"
    r = subprocess.run([str(target / "bin" / "python"), "-c", code.format(modules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_install_from_the_folder_alone_keeps_torch_and_skips_a_vllm_for_another_torch(tmp_path, machine):
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "bonesoup-probe-a", "1.0", requires=["bonesoup-probe-b==2.0", "torch"])
    _wheel(folder, "bonesoup-probe-b", "2.0")
    _wheel(folder, "bonesoup-probe-vllm", "1.0")
    _lists(folder, ["bonesoup-probe-a==1.0", "bonesoup-probe-b==2.0"], ["bonesoup-probe-vllm==1.0"])
    before = _torch_files()

    r = _install(folder, machine)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and r.stderr == "", r.stdout + r.stderr  # quiet: a few summary lines
    assert lines[0].startswith(f"torch {torch.__version__} ") and lines[0].endswith("kept as it is")
    assert lines[1].startswith(
        f"vllm skipped: vllm 0.29.0 pins torch 0.0.1, this machine has torch {torch.__version__} "
    )
    assert lines[2].startswith(f"installed from {folder} (requirements.txt, --no-index --no-deps)")

    # the probes went into the venv's own site-packages; torch is still this environment's, untouched
    site = next(machine.glob("lib/python*/site-packages"))
    a, b, vllm, torch_origin = _imports(machine, "bonesoup_probe_a", "bonesoup_probe_b", "bonesoup_probe_vllm", "torch")
    assert Path(a).is_relative_to(site) and Path(b).is_relative_to(site) and vllm == "None"
    assert Path(torch_origin) == SITE / "torch" / "__init__.py"
    assert not list(site.glob("torch*")) and _torch_files() == before

    # idempotent: a second run changes nothing and says the same
    installed = {p: p.stat().st_mtime_ns for p in site.rglob("*")}
    again = _install(folder, machine)
    assert again.returncode == 0 and again.stdout == r.stdout, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in site.rglob("*")} == installed and _torch_files() == before


def test_a_list_naming_torch_is_refused_before_anything_is_installed(tmp_path, machine):
    # The vllm list is the one taken when the machine's torch is the version it was resolved for;
    # a list that names torch itself (the download step never writes one) is refused.
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "bonesoup-probe-a", "1.0")
    _wheel(folder, "torch", "0.0.1", files={"torch/__init__.py": "__version__ = '0.0.1'\n"})
    _lists(folder, ["bonesoup-probe-a==1.0"], ["bonesoup-probe-a==1.0", "torch==0.0.1"], vllm_torch=TORCH)
    r = _install(folder, machine)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"install-gpu-offline: {folder}/requirements-vllm.txt names torch: "
        "refusing (the machine's torch is never replaced)"
    )
    assert _imports(machine, "bonesoup_probe_a") == ["None"]


def test_an_install_that_changes_torch_fails_loudly(tmp_path, machine):
    # A wheel that ships files under torch/ (a broken package, not a torch requirement) shadows the
    # machine's torch in the venv: the check after the install must catch it.
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "bonesoup-probe-shadow", "1.0", files={"torch/__init__.py": "__version__ = '0.0.1'\n"})
    _lists(folder, ["bonesoup-probe-shadow==1.0"], None)
    before = _torch_files()
    r = _install(folder, machine)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == "install-gpu-offline: torch no longer imports after the install"
    assert _torch_files() == before  # the machine's own torch files are still untouched


def test_broken_requirements_left_by_the_install_fail_loudly(tmp_path, machine):
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "bonesoup-probe-old", "1.0", requires=["torch<1"])
    _lists(folder, ["bonesoup-probe-old==1.0"], None)
    r = _install(folder, machine)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "install-gpu-offline: the install left broken requirements (pip check):",
        f"bonesoup-probe-old 1.0 has requirement torch<1, but you have torch {torch.__version__}.",
    ]


def test_bad_usage_gets_one_clear_answer_and_exit_2():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 2 and "download DIR" in r.stderr and "install DIR" in r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "install", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "install-gpu-offline: /nonexistent/requirements.txt not found: run the download step first"
    ]
