"""The rules import-linter cannot check, because bench/ and export/ are folders of scripts, not
packages: bench/ (its scripts and benchkit) imports no private name (``_x``, ``cpsl._C``) and
nothing from ``cpsl.cli``, never edits ``sys.path``, never exits with a message (``SystemExit("...")``
is exit code 1: bad input is one ``error:`` line and exit code 2, benchkit.errors.bench_main), and
no import circle runs through bench/ or export/ (lazy imports inside functions count)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _private(name: str) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in name.split("."))


def _local_name(path: Path, root: Path) -> str:
    """A module's import name with ``root`` (bench/, export/) on sys.path, as when its scripts run."""
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    """``(line, imported module, imported names)`` of every import, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, *([node.module] if node.module else [])])
            yield node.lineno, base, [a.name for a in node.names]


def _exits_with_message(node: ast.AST) -> bool:
    """``SystemExit("...")``, ``sys.exit(f"...")``, ``sys.exit(1)``: an exit that is not 0 or 2."""
    if not (isinstance(node, ast.Call) and ast.unparse(node.func) in ("SystemExit", "sys.exit", "exit") and node.args):
        return False
    arg = node.args[0]
    return isinstance(arg, ast.JoinedStr) or (isinstance(arg, ast.Constant) and arg.value not in (0, 2, None))


def scan(root: Path, files: list[Path]) -> tuple[list[str], dict[str, set[str]]]:
    """The rule breaks of ``files`` (under ``root``) and their local import graph."""
    problems, graph = [], {}
    mods = {_local_name(f, root): f for f in files}
    for mod, f in mods.items():
        tree = ast.parse(f.read_text(), str(f))
        where = f.relative_to(root.parent) if root.parent in f.parents else f
        graph[mod] = set()
        for line, base, names in _imports(tree, mod, f.name == "__init__.py"):
            full = [base] + [f"{base}.{n}" for n in names]
            if any(_private(x) for x in full):
                problems.append(f"{where}:{line}: imports a private name ({', '.join(full)})")
            if any(x == "cpsl.cli" or x.startswith("cpsl.cli.") for x in full):
                problems.append(f"{where}:{line}: imports from cpsl.cli (bench measures; the CLI is for users)")
            graph[mod] |= {x for x in full if x in mods and x != mod}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = ast.unparse(node.func)
                if target in ("sys.path.insert", "sys.path.append"):
                    problems.append(f"{where}:{node.lineno}: edits sys.path ({target})")
            if _exits_with_message(node):
                problems.append(f"{where}:{node.lineno}: exits with code 1 ({ast.unparse(node)[:60]}); "
                                "raise benchkit.errors.BenchError (one error line, exit 2)")
    return problems, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle of ``graph`` (each once, from its smallest module)."""
    found = set()

    def walk(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                found.add(tuple(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, [*path, nxt])
    for m in graph:
        walk(m, m, [m])
    return [list(c) for c in sorted(found)]


def bench_files(root: Path) -> list[Path]:
    return sorted([*root.glob("*.py"), *root.glob("benchkit/*.py")])


def test_bench_imports_no_private_name_nothing_from_the_cli_and_no_sys_path():
    problems, _ = scan(REPO / "bench", bench_files(REPO / "bench"))
    assert not problems, "\n".join(problems)


def test_no_import_circle_in_bench_or_export():
    for root, files in ((REPO / "bench", bench_files(REPO / "bench")),
                        (REPO / "export", sorted((REPO / "export").glob("*.py")))):
        _, graph = scan(root, files)
        assert not cycles(graph), f"{root.name}/: import circles {cycles(graph)}"


def test_the_scan_catches_each_wrong_arrow(tmp_path):
    """The checks above are not vacuous: a bench folder with each break is caught, by name."""
    (tmp_path / "benchkit").mkdir()
    (tmp_path / "benchkit" / "__init__.py").write_text("")
    (tmp_path / "benchkit" / "util.py").write_text("from .report import _fmt\n")
    (tmp_path / "benchkit" / "report.py").write_text("def _fmt(x):\n    return x\n")
    (tmp_path / "a.py").write_text("import sys\nsys.path.insert(0, 'x')\nfrom cpsl.ablate import _dirname\n"
                                   "def f():\n    import b\n    raise SystemExit(f'error: {f}')\n")
    (tmp_path / "b.py").write_text("from cpsl.cli.options import run_config\nfrom cpsl import _C\nimport a\n")
    (tmp_path / "ok.py").write_text("import sys\nfrom benchkit.errors import bench_main\nsys.exit(main())\n")
    problems, graph = scan(tmp_path, bench_files(tmp_path))
    text = "\n".join(problems)
    for want in ("a.py:2: edits sys.path", "a.py:3: imports a private name (cpsl.ablate, cpsl.ablate._dirname)",
                 "a.py:6: exits with code 1", "b.py:1: imports from cpsl.cli", "b.py:2: imports a private name",
                 "util.py:1: imports a private name (benchkit.report, benchkit.report._fmt)"):
        assert want in text, text
    assert not any(p.startswith("ok.py") or "ok.py" in p for p in problems), text
    assert cycles(graph) == [["a", "b"]]
