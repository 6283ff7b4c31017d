"""Build-time helpers for the clair_jax site (``hooks:`` and a griffe extension in mkdocs.yml).

* The notebooks' figures (``notebooks/figures/*.png``) are served as
  ``figures/*.png`` and ``CHANGELOG.md`` as a page, without second copies.
* ``api.md`` holds the marker ``<!-- api-reference -->``; it is replaced by one
  mkdocstrings directive per name in ``clair_jax.__all__``, read statically
  from ``clair_jax/__init__.py`` (nothing is imported), so a name added there
  is documented -- and its docstring checked by ``mkdocs build --strict`` --
  without editing the docs.
* :class:`SphinxRoles` (a griffe extension) turns the Sphinx roles the
  docstrings use (``:func:`~clair_jax.x.f```) into mkdocs-autorefs links. A
  role naming an object of the rendered reference becomes a required link (an
  object of an inner module links to where a rendered module re-exports it); one
  naming a real but unrendered object (a private helper, ``clair_jax.linalg``)
  becomes code text; one naming nothing that exists stays a required link, so
  ``--strict`` fails on it.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import griffe
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clair_jax"
FIGURES = ROOT / "notebooks" / "figures"
MARKER = "<!-- api-reference -->"

# Entry points first, in this order when present; then the other names of
# __all__ in their order; then the public submodules.
FIRST = ["clair", "clair_groups", "pool_verdicts", "ClairResult", "ClientVerdict", "ClairOptions", "LoRAFactors",
         "decompose", "Decomposition"]


# --------------------------------------------------------------------- mkdocs hooks

def on_files(files, config):
    for png in sorted(FIGURES.glob("*.png")):
        files.append(File(f"figures/{png.name}", str(FIGURES.parent), config["site_dir"],
                          config["use_directory_urls"]))
    # The changelog lives at the repository root, where people look for it.
    files.append(File("CHANGELOG.md", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        return markdown.replace(MARKER, api_markdown())
    return markdown


# --------------------------------------------------------------------- the public names

@lru_cache(maxsize=None)
def public_names():
    """``(name, rendered path, defining path, is_module)`` for each name of ``clair_jax.__all__``, entry points first."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    source, names = {}, []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clair_jax"):
            for alias in node.names:
                source[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = list(ast.literal_eval(node.value))
    if not names:
        raise RuntimeError("clair_jax/__init__.py defines no __all__")
    out = []
    for name in names:
        path = source.get(name, f"clair_jax.{name}")
        file_named = (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()
        is_module = file_named and path == f"clair_jax.{name}"
        # ``clair_jax.decompose`` is both a submodule and the function it exports:
        # such a name is documented under its defining module's path.
        shown = path if (file_named and not is_module) else f"clair_jax.{name}"
        out.append((name, shown, path, is_module))
    rank = {name: i for i, name in enumerate(FIRST)}
    objects = sorted((e for e in out if not e[3]), key=lambda e: rank.get(e[0], len(FIRST)))
    return tuple(objects) + tuple(sorted(e for e in out if e[3]))


def api_markdown():
    lines = ["## Entry points", ""]
    entries = public_names()
    for name, path, _, is_module in entries:
        if is_module and lines[-2] != "## Modules":
            lines += ["## Modules", ""]
        label = f"clair_jax.{name}" if is_module else name
        lines += [f"::: {path}", "    options:", "      heading_level: 3", f'      toc_label: "{label}"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------- griffe extension

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|data|attr|mod|obj|exc|const):`(~?)([\w.]+)(\(\))?`")


def _lookup(pkg, path):
    """The griffe object at ``path`` (aliases followed), or None."""
    if path == pkg.path:
        return pkg
    if not path.startswith(pkg.path + "."):
        return None
    try:
        obj = pkg[path[len(pkg.path) + 1:]]
        return obj.final_target if obj.is_alias else obj
    except Exception:
        return None


def _rendered(pkg, path):
    """Whether the API page documents ``path`` (it, or its module, is in ``__all__``)."""
    for name, shown, source, is_module in public_names():
        for base in {shown, source}:
            if path == base:
                return True
            if path.startswith(base + "."):
                rest = path[len(base) + 1:].split(".")
                if any(part.startswith("_") for part in rest):
                    return False
                if is_module:  # a module shows the names of its __all__
                    module = _lookup(pkg, base)
                    if module is None or rest[0] not in module.members:
                        return False
                    exports = module.exports
                    return rest[0] in exports if exports is not None else module.members[rest[0]].is_public
                return True
    return False


def _public_alias(pkg, path):
    """Where the API page shows the object at ``path`` when a rendered module re-exports it
    (``clair_jax.refine.partial_pool`` for ``clair_jax.shrinkage.partial_pool``), or None."""
    for _, shown, _, is_module in public_names():
        module = _lookup(pkg, shown) if is_module else None
        if module is None or module.exports is None:
            continue
        for name in module.exports:
            member = module.members.get(str(name))
            try:
                if member is not None and member.is_alias and member.final_target.path == path:
                    return f"{shown}.{name}"
            except Exception:   # an alias griffe cannot resolve names nothing here
                continue
    return None


def _rewrite(pkg, obj, text):
    def link(match):
        short, target, call = match.groups()
        title = (target.rsplit(".", 1)[-1] if short else target) + (call or "")
        path = target
        if not target.startswith("clair_jax"):
            head, _, rest = target.partition(".")
            try:
                path = obj.resolve(head) + (f".{rest}" if rest else "")
            except Exception:
                return f"[`{title}`][{target}]"  # resolves to nothing: autorefs fails the strict build
        found = _lookup(pkg, path)
        if found is not None and found.is_module and match.group(0)[1:5] in ("func", "clas"):
            # ``:func:`clair_jax.decompose``` means the function the package exports.
            inner = found.members.get(path.rsplit(".", 1)[-1])
            if inner is not None:
                path, found = f"{path}.{inner.name}", inner
        if found is None:
            return f"[`{title}`][{path}]"  # no such object: autorefs fails the strict build
        if _rendered(pkg, path):
            return f"[`{title}`][{path}]"
        alias = _public_alias(pkg, found.path)
        if alias is not None:   # defined in an inner module, shown where a stage re-exports it
            return f"[`{title}`][{alias}]"
        return f"`{title}`"  # real but not in the public reference

    return ROLE.sub(link, text)


class SphinxRoles(griffe.Extension):
    """Sphinx roles in docstrings → autorefs links (see the module docstring)."""

    def on_package(self, *, pkg, **kwargs):
        seen = set()

        def walk(obj):
            if obj.is_alias or obj.path in seen:
                return
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(pkg, obj, obj.docstring.value)
            for member in obj.members.values():
                walk(member)

        walk(pkg)
