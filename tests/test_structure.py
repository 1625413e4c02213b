"""The package's shape: subpackages by job, imports only downward, no cycles,
FLAGS read only by the command layer, one brute-force kNN."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dplg_tf"
# DESIGN's layers, bottom up: a module imports only from its own layer or lower
# ones (the top-level modules errors, config and console are the bottom).
LAYERS = [{"errors", "config", "console"}, {"storage", "images"}, {"nn"}, {"data"},
          {"training"}, {"export"}, {"http"}, {"serving"}, {"retrieval"},
          {"search", "bulk", "demo"}, {"cli"}]
ADVISED_MODULE_LINES = 400  # advice, printed by test_module_sizes; not a reason to split
MAX_MODULE_LINES = 800      # a module past this is refused: split it by job


def _modules():
    """{dotted name: path} of every module of dplg_tf."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name, path, modules):
    """The package modules `name` imports, at the top or inside functions."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target in modules and target != name:
                out.add(target)
    return out


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def _graph():
    modules = _modules()
    # a package's __init__ importing its own modules is not a cycle of ours
    return {name: {m for m in _imports(name, path, modules) if not name.startswith(m + ".")}
            for name, path in modules.items()}


def _layer(module):
    """The index in LAYERS of a dotted module name (None for dplg_tf itself)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for i, group in enumerate(LAYERS):
        if parts[1] in group:
            return i
    raise AssertionError(f"{module} belongs to no layer of DESIGN.md; add it to LAYERS")


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_the_package_modules():
    graph = _graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 100  # the walk sees imports
    assert _cycles(graph) == []


def test_subpackages_import_only_from_the_layers_below_them():
    upward = []
    for name, targets in _graph().items():
        for target in targets:
            if _layer(name) is not None and _layer(target) is not None \
                    and _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert _layer("dplg_tf.images.limits") < _layer("dplg_tf.serving.client")
    assert _layer("dplg_tf.errors") == 0 and _layer("dplg_tf.cli.eval") == len(LAYERS) - 1


def test_the_top_level_is_small_and_the_subpackages_are_the_layout():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "config.py", "console.py", "errors.py"]
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set().union(*LAYERS) - {"errors", "config", "console"}
    for sub in subpackages:  # each says what lives there and what it may import
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), sub


def test_only_the_command_layer_reads_flags():
    readers = []
    for name, path in _modules().items():
        if name.startswith("dplg_tf.cli"):
            continue
        text = path.read_text()
        if re.search(r"\bFLAGS\b", text) or re.search(r"from absl import [^\n]*\bflags\b", text):
            readers.append(name)
    assert readers == []


def test_one_module_holds_brute_force_knn():
    """Top-k selection over scores (argpartition, argsort of negated scores) is
    done in retrieval.knn only; evaluation, QE, DBA and exact search call it."""
    pattern = re.compile(r"argpartition|argsort\(-")
    holders = sorted(name for name, path in _modules().items() if pattern.search(path.read_text()))
    assert holders == ["dplg_tf.retrieval.knn"]


def test_one_function_is_the_query_path():
    """QE, DBA and re-ranking are applied by retrieval.query.run alone: no
    other module calls their functions (the index applies DBA to what it
    adds; the command layer reads the re-ranker's default numbers)."""
    steps = {"alpha_qe", "dba", "dba_neighbours", "index_neighbours", "exact_neighbours",
             "rerank", "_rerank_chunk"}
    own = {"dplg_tf.retrieval.query", "dplg_tf.retrieval.expansion", "dplg_tf.retrieval.rerank"}
    callers = set()
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        imported = {a.asname or a.name for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module in (
                        "dplg_tf.retrieval.expansion", "dplg_tf.retrieval.rerank")
                    for a in node.names}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            called = f.id if isinstance(f, ast.Name) and f.id in imported else (
                f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                and f.value.id in ("expansion", "rerank", "superglobal") else None)
            if called in steps:
                callers.add((name, called))
    assert ("dplg_tf.retrieval.query", "alpha_qe") in callers   # the walk sees calls
    assert sorted(f"{n}: {c}" for n, c in callers if n not in own) == []


def test_the_command_layer_is_thin():
    """A command parses its flags and calls a library function: no module of
    cli/ holds a pipeline (the demo's is demo.pipeline)."""
    sizes = {n: p.read_text().count("\n") for n, p in _modules().items()
             if n.startswith("dplg_tf.cli.")}
    assert len(sizes) > 10 and sizes["dplg_tf.cli.demo"] < 80
    assert [n for n, lines in sizes.items() if lines > 200] == []


def test_module_sizes(capsys):
    """Modules past ADVISED_MODULE_LINES are listed (advice); past
    MAX_MODULE_LINES they are refused."""
    sizes = {n: p.read_text().count("\n") for n, p in _modules().items()}
    assert len(sizes) > 60   # the walk sees the modules
    long = [f"{n}: {lines}" for n, lines in sizes.items() if lines > ADVISED_MODULE_LINES]
    with capsys.disabled():
        if long:
            print("\nmodules over the advised size:", ", ".join(long))
    assert [n for n, lines in sizes.items() if lines > MAX_MODULE_LINES] == []


def test_the_wheel_ships_every_subpackage_and_the_configs():
    """pyproject.toml lists the packages (so that configs/ can be mapped to
    dplg_tf.configs): every folder of dplg_tf with an __init__.py is listed."""
    import tomllib

    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"][
        "setuptools"]
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts)
             for p in PACKAGE.rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"dplg_tf.configs"}
    assert setuptools["package-dir"] == {"dplg_tf.configs": "configs"}
    assert (PACKAGE.parent / "configs" / "demo_cpu.py").is_file()


def test_no_module_uses_private_modules_of_ray():
    users = sorted(n for n, p in _modules().items() if re.search(r"\bray\._", p.read_text()))
    assert users == []


def _calls(tree, owners, functions):
    """The calls owner.function(...) in `tree` (an owner: a module's name or
    alias), and the calls of those functions imported by name."""
    imported = {a.asname or a.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module in owners
                for a in node.names if a.name in functions}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in functions and isinstance(
                f.value, ast.Name) and f.value.id in owners:
            found.append(f"{f.value.id}.{f.attr}")
        elif isinstance(f, ast.Name) and f.id in imported:
            found.append(f.id)
    return found


def test_the_call_finder_sees_calls_by_module_and_by_imported_name():
    tree = ast.parse("import numpy as np\nfrom os import replace as r\n"
                     "np.load('a')\nr('a', 'b')\nx.load('c')\n")
    assert _calls(tree, {"np", "numpy", "os"}, {"load", "replace"}) == ["np.load", "r"]


def test_numpy_files_are_read_only_in_storage():
    """np.load (pickles, unbounded allocations) is called in dplg_tf/storage
    alone, where each file is checked before use."""
    readers = sorted(f"{name}: {call}" for name, path in _modules().items()
                     if not name.startswith("dplg_tf.storage.")
                     for call in _calls(ast.parse(path.read_text()), {"np", "numpy"},
                                        {"load", "fromfile", "memmap", "loadtxt"}))
    assert readers == []


def test_every_rename_is_in_storage_atomic():
    """Files are published by storage.atomic alone (atomic_path, set_aside,
    StateFolder): no other module renames or moves a file."""
    movers = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        calls = _calls(tree, {"os", "shutil"}, {"replace", "rename", "renames", "move"})
        calls += [node.func.attr for node in ast.walk(tree)   # pathlib's Path.rename
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("rename", "renames")
                  and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "os")]
        movers += [f"{name}: {call}" for call in calls]
    assert sorted(m for m in movers if not m.startswith("dplg_tf.storage.atomic:")) == []
    assert "dplg_tf.storage.atomic: os.replace" in movers   # the walk sees the calls


def test_bazel_lists_every_test_file():
    tests = pathlib.Path(__file__).parent
    listed = set(re.findall(r'"([\w/]*test_\w+)"', (tests / "BUILD").read_text()))
    found = {str(p.relative_to(tests).with_suffix("")) for p in tests.rglob("test_*.py")}
    assert listed == found


def test_every_console_script_resolves_and_every_command_runs_as_a_module():
    import importlib
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    for script, target in project["scripts"].items():
        module, _, function = target.partition(":")
        assert module.startswith("dplg_tf.cli."), script
        assert callable(getattr(importlib.import_module(module), function)), script
    for path in (PACKAGE / "cli").glob("*.py"):
        if path.stem not in ("__init__", "flags"):  # `python -m dplg_tf.cli.<name>` works
            assert 'if __name__ == "__main__":' in path.read_text(), path.name


def _layout_entries():
    """{subpackage: its text} of the README's Layout tree."""
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme.split("\n## Layout", 1)[1].split("```", 2)[1]
    entries, name = {}, None
    for line in tree.splitlines():
        found = re.match(r"  (\w+)/ ", line)
        if found:
            name = found.group(1)
        elif not line.startswith("        "):
            name = None
        if name:
            entries[name] = entries.get(name, "") + " " + line
    return entries


def test_the_readme_layout_and_docstrings_name_every_module():
    """README "Layout" and each subpackage's docstring name its modules (cli/
    is one module a command: test_every_console_script_resolves... holds it)."""
    entries = _layout_entries()
    assert {"storage", "nn", "search", "demo"} <= set(entries)   # the parser sees the tree
    missing = []
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        package = init.parent.name
        if package == "cli":
            continue
        modules = sorted(p.stem for p in init.parent.glob("*.py") if p.stem != "__init__")
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in modules + sorted(p.name for p in init.parent.iterdir()
                                       if (p / "__init__.py").is_file()):
            for where, text in (("README Layout", entries.get(package, "")),
                                (f"{package}/__init__.py", doc)):
                if not re.search(rf"\b{module}\b", text):
                    missing.append(f"{where} lacks {package}.{module}")
    assert missing == []
