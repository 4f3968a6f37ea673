"""The layout promises of the README, checked on the source itself.

Layers: support/ (what the core stands on) <- the seven core files <- scripts/, baselines/, bench/ (programs).
An import never points up a layer, no module imports itself back through others (function-local imports count),
and no module imports a name only to hand it on (no re-exports)."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("model", "lora", "data", "welford", "resure", "train", "eval")
THIRD_PARTY = {"torch", "tokenizers", "safetensors", "numpy"}
PROGRAMS = ("scripts", "baselines", "bench")


def project_files():
    """Module name -> path of every project source file (bench/ modules import each other by bare name)."""
    files = {name: ROOT / f"{name}.py" for name in CORE}
    for folder in ("support", *PROGRAMS):
        for path in sorted((ROOT / folder).glob("*.py")):
            stem = folder if path.stem == "__init__" else f"{folder}.{path.stem}"
            files[path.stem if folder == "bench" else stem] = path
    return files


def imports(path):
    """(module, line) of every import in a file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return out


def project_imports(path, files):
    """The project modules a file imports (`from support import runs` counts as support.runs)."""
    return {module for module, _ in imports(path) if module in files}


def layer(module):
    top = module.split(".")[0]
    if top == "support":
        return 0
    if top in CORE:
        return 1
    return 2


def test_no_function_over_60_lines_but_argument_parsers():
    long = []
    for name in CORE:
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            parser = any(isinstance(n, ast.Attribute) and n.attr == "add_argument" for n in ast.walk(node))
            if node.end_lineno - node.lineno + 1 > 60 and not parser:
                long.append(f"{name}.py:{node.lineno} {node.name}")
    assert not long, long


def test_core_imports_only_the_runtime_dependencies():
    bad = []
    for name in CORE:
        for module, line in imports(ROOT / f"{name}.py"):
            top = module.split(".")[0]
            allowed = top in sys.stdlib_module_names or top in THIRD_PARTY or top in CORE or top == "support"
            if not allowed:
                bad.append(f"{name}.py:{line} imports {module}")
    assert not bad, bad


def test_imports_never_point_up_a_layer():
    files = project_files()
    bad = []
    for module, path in files.items():
        for target in project_imports(path, files):
            if layer(target) > layer(module):
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, bad


def test_no_import_circle():
    files = project_files()
    graph = {module: project_imports(path, files) - {module} for module, path in files.items()}
    circles = []

    def visit(module, path):
        for target in sorted(graph[module]):
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, circles


def test_no_re_exports():
    """A core or support module uses every name it imports from the project (none is imported to pass on)."""
    bad = []
    paths = [ROOT / f"{name}.py" for name in CORE] + sorted((ROOT / "support").glob("*.py"))
    for path in paths:
        tree = ast.parse(path.read_text())
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {node.value.id for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module is None:
                continue
            if node.module.split(".")[0] not in (*CORE, "support"):
                continue
            for alias in node.names:
                if (alias.asname or alias.name) not in used:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} without using it")
    assert not bad, bad


def test_no_issue_numbers_in_code_tests_or_docs():
    files = [ROOT / f"{name}.py" for name in CORE] + [ROOT / "README.md"]
    for folder in ("support", *PROGRAMS, "tests", "docs"):
        files += sorted((ROOT / folder).glob("*.py")) + sorted((ROOT / folder).glob("*.md"))
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bissues? #?\d|\bissue\d", line, re.I):
                hits.append(f"{path.relative_to(ROOT)}:{number}")
    assert not hits, hits
