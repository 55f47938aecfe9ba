"""The house's rules, checked on the source: imports flow one way, no import cycles, small files."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kdistill"

# the ground floor: these import nothing above them
GROUND = ("data", "models", "losses", "evaluate", "errors", "taps", "adapters", "files", "seeding", "outputs",
          "configbase", "train_config", "provenance")
ABOVE = ("engine", "schemes", "distiller", "config", "llm", "encoders", "cli", "tasks", "objective", "wiring",
         "teachers", "demo", "report", "progress", "api", "audit", "datafree", "search")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """kdistill modules `path` imports (every import statement, or only those run at import time)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("kdistill"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kdistill"))
    return found


def sources():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def first_part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_ground_floor_imports_nothing_above_it():
    bad = []
    for path in sources():
        if first_part(module_name(path)) not in GROUND:
            continue
        for target in imports(path, top_level_only=False):
            if first_part(target) in ABOVE:
                bad.append(f"{path.relative_to(ROOT.parent)} imports {target}")
    assert not bad, "ground-floor modules import upward:\n" + "\n".join(bad)


def test_no_import_cycles_at_import_time():
    known = {module_name(p) for p in sources()}
    graph = {}
    for path in sources():
        deps = {t for t in imports(path, top_level_only=True) if t in known and t != module_name(path)}
        graph[module_name(path)] = deps
    # a package's __init__ imported by its own submodule is Python's normal parent import, not a cycle
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kdistill.engine import Engine\n")
    assert "kdistill.engine" in imports(bad, top_level_only=False)
    assert "kdistill.engine" not in imports(bad, top_level_only=True)


def test_no_file_over_the_limit():
    long = [f"{p.relative_to(ROOT.parent)}: {n}" for p in sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)
