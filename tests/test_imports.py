"""The package's modules import one another without cycles.

Every module of `lbcl_jax` is parsed (not imported), and each `import` / `from ... import` it
holds, at the top level or inside a function, that names a module of the package is an edge of
the import graph. A cycle, even through function-level imports that happen to run late, ties
modules that should be layered (the driver, its settings, the exporter): it fails here with its
modules in order.
"""

from __future__ import annotations

import ast
import pathlib

from conftest import REPO_ROOT

PACKAGE = "lbcl_jax"


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted name -> file of every module of the package (a package is its __init__.py)."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The package module `name` is, or lives in (`a.b.c` -> `a.b` when `c` is a name in it)."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules `module` imports anywhere in its file: `import a.b` is an edge to
  `a.b`; `from a import x` to `a.x` when that is a module, else to `a` (x is a name in it)."""
  is_package = path.name == "__init__.py"
  package = module if is_package else module.rpartition(".")[0]
  targets = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
    if isinstance(node, ast.Import):
      targets += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                  for a in node.names]
  found = {_resolve(t, modules) for t in targets
           if t == PACKAGE or t.startswith(PACKAGE + ".")}
  return found - {None, module}


def import_graph(root: pathlib.Path = REPO_ROOT) -> dict[str, set[str]]:
  """Module -> the package modules it imports (top level and inside functions)."""
  modules = _modules(root)
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one_and_only_one():
  """The search itself: a planted cycle is named in order, an acyclic graph passes."""
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_import_graph_sees_function_level_imports(tmp_path):
  """A package laid out in a temporary root: an import inside a function is an edge, a
  relative import is resolved, a name imported from a module is an edge to that module."""
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from lbcl_jax import b\n  return b\n")
  (pkg / "b.py").write_text("from lbcl_jax.sub.c import thing\n")
  (pkg / "sub" / "c.py").write_text("from .. import a\nthing = 1\n")
  graph = import_graph(tmp_path)
  assert graph["lbcl_jax.a"] == {"lbcl_jax.b"}
  assert graph["lbcl_jax.b"] == {"lbcl_jax.sub.c"}
  assert graph["lbcl_jax.sub.c"] == {"lbcl_jax.a"}
  assert find_cycle(graph) == ["lbcl_jax.a", "lbcl_jax.b", "lbcl_jax.sub.c", "lbcl_jax.a"]


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert "lbcl_jax.train" in graph and graph["lbcl_jax.train"], "the walk found no imports"
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
