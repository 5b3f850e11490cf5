"""The rooms' import rules, read from the source with ``ast`` (nothing is imported).

- core (``src/``) imports nothing of ``stemagent.simulators``, ``.drivers`` or ``.agent``;
- simulators and drivers never import ``stemagent.agent``;
- the agent's own modules import no simulator and no driver (the wiring room hands them over);
- nothing outside the wiring room (``stemagent.agent.app``) imports it;
- no import cycle between files (imports inside functions count too);
- an import inside a function says why in a comment on its line or just above (a heavy or
  optional dependency).
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``


def package_dirs() -> dict[str, Path]:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapping = {k: ROOT / v for k, v in conf.get("package-dir", {}).items()}
    out = {}
    for pkg in conf["packages"]:
        parent = max((k for k in mapping if pkg == k or pkg.startswith(k + ".")), key=len)
        rest = pkg[len(parent):].lstrip(".")
        out[pkg] = mapping[parent].joinpath(*rest.split(".")) if rest else mapping[parent]
    return out


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in package_dirs().items():
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The module ``name`` refers to: itself, or its nearest known parent (``a.b.C`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def edges(known: dict[str, Path]) -> list[Edge]:
    out: list[Edge] = []
    for mod, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = mod if path.stem == "__init__" else mod.rpartition(".")[0]

        def visit(node: ast.AST, local: bool, type_only: bool, mod: str = mod, path: Path = path, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                inner_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                inner_type = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")
                        base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                    names = [f"{base}.{a.name}" for a in child.names] if base else []
                for n in names:
                    if n.startswith("stemagent"):
                        target = _resolve(n, known)
                        if target and target != mod:
                            out.append(Edge(mod, target, path, child.lineno, local, type_only))
                visit(child, inner_local, inner_type, mod, path, package)

        visit(tree, False, False)
    return out


def room(mod: str) -> str:
    for r in ("stemagent.agent.app", "stemagent.agent", "stemagent.drivers", "stemagent.simulators"):
        if mod == r or mod.startswith(r + "."):
            return r
    return "core"


KNOWN = modules()
EDGES = edges(KNOWN)


def _where(e: Edge) -> str:
    return f"{e.path.relative_to(ROOT)}:{e.line} {e.source} -> {e.target}"


def test_every_room_is_found():
    rooms = {room(m) for m in KNOWN}
    assert rooms == {"core", "stemagent.agent", "stemagent.agent.app", "stemagent.drivers", "stemagent.simulators"}
    assert len(EDGES) > 100


def test_core_imports_nothing_above_it():
    bad = [_where(e) for e in EDGES if room(e.source) == "core" and room(e.target) != "core"]
    assert not bad, bad


def test_drivers_and_simulators_never_import_the_agent():
    bad = [_where(e) for e in EDGES if room(e.source) in ("stemagent.drivers", "stemagent.simulators")
           and room(e.target).startswith("stemagent.agent")]
    assert not bad, bad


def test_the_agent_gets_devices_from_the_wiring_room():
    bad = [_where(e) for e in EDGES if room(e.source) == "stemagent.agent"
           and room(e.target) in ("stemagent.drivers", "stemagent.simulators", "stemagent.agent.app")]
    assert not bad, bad


def test_nothing_outside_the_wiring_room_imports_it():
    bad = [_where(e) for e in EDGES if room(e.target) == "stemagent.agent.app" and room(e.source) != "stemagent.agent.app"]
    assert not bad, bad


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first == last), or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if colour.get(m) is None:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour.get(n) is None:
            found = dfs(n)
            if found:
                return found
    return None


def test_no_import_cycles_between_files():
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        if not e.type_only:
            graph.setdefault(e.source, set()).add(e.target)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_imports_inside_functions_say_why():
    bad = []
    for path in KNOWN.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here = lines[node.lineno - 1]
                    above = [ln.strip() for ln in lines[max(0, node.lineno - 5): node.lineno - 1]]
                    if "#" not in here and not any(ln.startswith("#") for ln in above):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not bad, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(bad)))
