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
