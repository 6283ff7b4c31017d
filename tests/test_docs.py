"""The documentation: the README stays short, the site builds with ``mkdocs build --strict``.

The strict build fails on any warning: a broken link between pages, a
docstring reference (``:func:`x```) to a name that does not exist, a docstring
whose Args name a parameter the function does not have. The API page is
generated from ``clair_jax.__all__`` (docs/_hooks.py); the tests check that
every public name got its entry.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import clair_jax as cj
from clair_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _mkdocs_build(root, site):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # No -q: mkdocs counts warnings for --strict only at the default log level.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(root / "mkdocs.yml"), "-d", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    proc = _mkdocs_build(ROOT, site)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def test_site_builds_strictly_with_every_page_and_figure(site):
    for page in PAGES:
        name = page.stem
        built = site / ("index.html" if name == "index" else f"{name}/index.html")
        assert built.is_file(), f"{page.name} was not built"
    figures = sorted(p.name for p in (ROOT / "notebooks" / "figures").glob("*.png"))
    assert figures and sorted(p.name for p in (site / "figures").glob("*.png")) == figures
    assert (site / "CHANGELOG" / "index.html").is_file()


def test_api_reference_documents_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    ids = set(re.findall(r'id="(clair_jax[\w.]*)"', html))
    missing = []
    for name in cj.__all__:
        obj = getattr(cj, name)
        if isinstance(obj, type(cj)):  # a public submodule: each name of its __all__
            for member in getattr(obj, "__all__", []):
                if f"{obj.__name__}.{member}" not in ids:
                    missing.append(f"{obj.__name__}.{member}")
        elif not {f"clair_jax.{name}", f"{obj.__module__}.{name}"} & ids:
            missing.append(f"clair_jax.{name}")
    assert not missing, f"not in the API reference: {missing}"
    assert ":func:" not in html and ":class:" not in html  # Sphinx roles became links


@pytest.mark.slow   # a second full site build (~1 min on 2 cores)
def test_strict_build_fails_on_a_reference_to_nothing(tmp_path):
    """A docstring citing a name that does not exist must fail the build, not print as text."""
    for part in ("mkdocs.yml", "CHANGELOG.md", "docs", "clair_jax", "notebooks/figures"):
        src, dst = ROOT / part, tmp_path / part
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    metrics = tmp_path / "clair_jax" / "metrics.py"
    text = metrics.read_text()
    metrics.write_text(text.replace('"""Contamination detection rates;',
                                    '"""See :func:`no_such_function`. Contamination detection rates;', 1))
    assert metrics.read_text() != text
    proc = _mkdocs_build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    assert "no_such_function" in proc.stdout + proc.stderr


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    fence = lines.index("```bash")
    assert lines[fence + 1].startswith("pip install -e . && clair demo")
    assert lines[fence + 2].startswith('pip install -e ".[test]"')
    assert lines[fence + 3] == "```"


@pytest.mark.parametrize("path", [README, ROOT / "CHANGELOG.md"], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Files read on the repository host too; links between docs pages are checked by the strict build."""
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_docs_state_facts_not_history(path):
    """History goes to CHANGELOG.md; README and docs say what holds now."""
    text = path.read_text().lower()
    for phrase in ("session", "used to", "previous run", "earlier run", "before this", "was measured before",
                   "took it from", "ago"):
        # Whole words: "block-diagonal" is no "ago".
        assert not re.search(rf"\b{phrase}\b", text), f"{path.name} narrates history: {phrase!r}"


#: The modules of the detection and refinement stages: their rules are tabled in docs/method.md.
STAGE_MODULES = ("detect", "refine", "robust", "basis", "refit", "shrinkage", "fallbacks", "centre")


def _rule_table():
    """{first cell: row} of the table under "Every rule, its reason and its test" in docs/method.md."""
    text = (ROOT / "docs" / "method.md").read_text()
    section = text.split("### Every rule, its reason and its test", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| rule ")]
    return {row.split(" | ")[0]: row for row in rows}


def test_rule_table_names_every_constant_of_detection_and_refinement():
    import ast

    names = set()
    for module in STAGE_MODULES:
        tree = ast.parse((ROOT / "clair_jax" / f"{module}.py").read_text())
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            names |= {t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()}
    # Re-exported ones too: what ``cj.detect.X`` / ``cj.refine.X`` gives is a rule of that stage.
    names |= {n for module in (cj.detect, cj.refine) for n in vars(module) if n.isupper() and not n.startswith("_")}
    assert {"MIN_GAP", "SUBSPACE_CLIP", "DECISIVE_Z", "CROWDED_SHARE"} <= names
    cells = " ".join(_rule_table())
    missing = sorted(n for n in names if f"`{n}`" not in cells)
    assert not missing, f"docs/method.md's rule table lacks {missing}"


def test_rule_table_cites_tests_that_exist():
    cited = set()
    for row in _rule_table().values():
        cells = row.split(" | ")
        assert len(cells) == 5, f"a rule's row has five cells: {row[:80]}"
        found = re.findall(r"(test_\w+\.py)::(test_\w+)", cells[3])
        assert found, f"no test cited for {cells[0]}"
        cited |= set(re.findall(r"(test_\w+\.py)::(test_\w+)", row))
    for path, name in sorted(cited):
        source = (ROOT / "tests" / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/method.md cites {path}::{name}, which does not exist"


def test_cli_version_and_plain_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"clair_jax {cj.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    for command in cli.COMMANDS:
        assert command in out
