"""The layout promises of the README, checked on the source itself: seven short core files that import only torch,
tokenizers, safetensors, numpy, the standard library, each other and tools/; no long functions; imports that
point one way (bench/ and baselines/ use the core, never the reverse; tools/ never needs the core to import)."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("model", "lora", "data", "welford", "resure", "train", "eval")
THIRD_PARTY = {"torch", "tokenizers", "safetensors", "numpy"}


def _imports(path, top_level_only=False):
    """(module, line) of every import in a file (only the module-level ones with top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def test_core_files_are_short():
    lengths = {name: len((ROOT / f"{name}.py").read_text().splitlines()) for name in CORE}
    assert max(lengths.values()) <= 450 and sum(lengths.values()) <= 2400, lengths


def test_no_function_over_60_lines_but_argument_parsers():
    long = []
    for name in CORE:
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                if not any(isinstance(n, ast.Attribute) and n.attr == "add_argument" for n in ast.walk(node)):
                    long.append(f"{name}.py:{node.lineno} {node.name}")
    assert not long, long


def test_core_imports_only_the_runtime_dependencies():
    bad = []
    for name in CORE:
        for mod, line in _imports(ROOT / f"{name}.py"):
            top = mod.split(".")[0]
            if not (top in sys.stdlib_module_names or top in THIRD_PARTY or top in CORE or top == "tools"):
                bad.append(f"{name}.py:{line} imports {mod}")
    assert not bad, bad


def test_imports_point_one_way():
    """tools/ never imports the core at module level (the core may import tools/ lazily, so no cycle can form);
    neither the core nor tools/ import bench/ or baselines/."""
    bad = []
    for path in [ROOT / f"{n}.py" for n in CORE] + sorted((ROOT / "tools").glob("*.py")):
        for mod, line in _imports(path):
            if mod.split(".")[0] in ("bench", "baselines"):
                bad.append(f"{path.name}:{line} imports {mod}")
    for path in sorted((ROOT / "tools").glob("*.py")):
        for mod, line in _imports(path, top_level_only=True):
            if mod.split(".")[0] in CORE:
                bad.append(f"tools/{path.name}:{line} imports {mod} at module level")
    assert not bad, bad


def test_no_issue_numbers_in_code_or_readme():
    files = [ROOT / f"{n}.py" for n in CORE] + [*(ROOT / "tools").glob("*.py"), *(ROOT / "bench").glob("*.py"),
                                                  *(ROOT / "baselines").glob("*.py"), ROOT / "README.md"]
    hits = [f"{p.name}:{i}" for p in files if p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bissues? #?\d", line, re.I)]
    assert not hits, hits
