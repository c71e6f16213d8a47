"""The house rules of docs/architecture.md, checked on the source: which module may import which, no import
cycles, imports at the top of a file unless a comment says why, no generic module that names an editor, and no
file over the size a reader can hold."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import setuptools

from algs import EDITORS, settings_groups

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "tests", "outputs", "__pycache__", "docs", "config"}

# Each part and the parts it may import (docs/architecture.md, "The parts"). A module not listed is an error.
ALLOWED = {
    "errors": set(),
    "losses": set(),
    "utils": set(),
    "reporting": set(),
    "blocks": set(),
    "signals": set(),
    "ranges": set(),
    "progress": set(),
    "hub": set(),
    "fact_report": set(),
    "preflight": {"errors"},
    "config_schema": {"algs", "errors", "ranges"},
    "distributed": {"errors"},
    "models": {"errors", "hub", "models"},
    "meta_loss": {"losses", "utils"},
    "editable_model": {"errors", "losses", "meta_loss"},
    "algs": {"algs", "editable_model", "errors", "losses", "meta_loss", "models", "ranges", "utils"},
    "data_classes": {"data_classes", "errors", "hub", "losses", "progress", "utils"},
    "memory": {"algs", "blocks"},
    "checkpoints": {"config_schema", "distributed", "errors", "models", "utils"},
    "patches": {"checkpoints", "editable_model", "errors", "utils"},
    "editor_io": {"checkpoints", "errors", "models", "patches", "reporting"},
    "peft_export": {"errors", "models", "patches"},
    "key_stats": {"data_classes", "progress"},
    "sequential": {"data_classes", "errors"},
    "scoring": {"editable_model", "losses", "models", "utils"},
    "fact_metrics": {"data_classes", "losses"},
    "eval_progress": {"errors", "utils"},
    "fact_eval": {
        "data_classes",
        "errors",
        "eval_progress",
        "fact_metrics",
        "fact_report",
        "preflight",
        "progress",
        "scoring",
        "utils",
    },  # fmt: skip
    "easyedit_api": {"data_classes", "fact_metrics"},
    "train_state": {"checkpoints", "distributed", "errors", "utils"},
    "trainer": {
        "blocks",
        "checkpoints",
        "distributed",
        "editable_model",
        "errors",
        "memory",
        "meta_loss",
        "ranges",
        "reporting",
        "signals",
        "train_state",
        "utils",
    },  # fmt: skip
    "evaluation": {"checkpoints", "distributed", "reporting", "utils"},
    "run": {
        "algs",
        "checkpoints",
        "config_schema",
        "data_classes",
        "distributed",
        "errors",
        "evaluation",
        "memory",
        "models",
        "trainer",
        "utils",
    },  # fmt: skip
    "editing": {
        "algs",
        "checkpoints",
        "data_classes",
        "easyedit_api",
        "editor_io",
        "errors",
        "key_stats",
        "losses",
        "models",
        "patches",
        "peft_export",
        "preflight",
        "progress",
        "sequential",
        "utils",
    },  # fmt: skip
    "edit": {
        "data_classes",
        "editing",
        "editor_io",
        "errors",
        "eval_progress",
        "fact_eval",
        "fact_report",
        "patches",
        "preflight",
        "progress",
        "signals",
        "utils",
    },  # fmt: skip
}
# The tools on top may import any part of the project, but not each other's internals the other way round.
TOOLS = {"scripts", "benchmarks"}
# Generic modules: they know editors only through the contract (editable_model.EditableModel) and the registry.
GENERIC = {"blocks", "trainer", "checkpoints", "patches", "memory", "distributed", "run", "edit", "reporting", "ranges",
           "config_schema", "sequential", "signals", "utils", "losses", "editable_model", "fact_eval",
           "editing", "scoring", "fact_metrics", "fact_report", "easyedit_api", "progress",
           "editor_io", "peft_export", "key_stats", "preflight", "eval_progress"}  # fmt: skip
# The registered editors (algs/<name>/), their classes and their settings classes, as the registry finds them.
EDITOR_NAMES = tuple(EDITORS)
EDITOR_CLASSES = tuple(m.EDITOR for m in EDITORS.values())
SETTINGS_CLASSES = tuple(group.__name__ for group in settings_groups().values())
MAX_LINES = 650


BUILD_OUTPUTS = {"build", "dist"}  # and *.egg-info: what `pip install .` or a packaging run leaves in the tree


def _source_files():
    """The project's .py files outside SKIP_DIRS: in a git checkout the files git tracks or would track (new files
    not yet added count, ignored ones such as build/ after `pip install .` do not); elsewhere (a source tarball)
    every file except the build outputs."""
    try:
        proc = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        listed = proc.stdout.split("\0") if proc.returncode == 0 else None
    except OSError:  # no git on this machine
        listed = None
    if listed is None:
        skip = SKIP_DIRS | BUILD_OUTPUTS
        listed = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
            listed += [str((Path(dirpath) / f).relative_to(ROOT)) for f in filenames if f.endswith(".py")]
    paths = (ROOT / rel for rel in listed if rel)
    return sorted(p for p in paths if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts[:-1]))


def _modules():
    found = {}
    for path in _source_files():
        name = str(path.relative_to(ROOT))[:-3].replace(os.sep, ".")
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _resolve(name: str):
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path):
    """(line, imported project module, at module level) for every import of a project module in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level if / try count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                full = f"{base}.{node.module}" if node.module else base
            else:
                full = node.module
            targets = [full] + [f"{full}.{a.name}" for a in node.names]
        for t in targets:
            resolved = _resolve(t)
            if resolved and resolved != module:
                out.append((node.lineno, resolved, id(node) in top_level))
    return out


def _part(module: str) -> str:
    return module.split(".")[0]


GRAPH = {m: {target for _, target, _ in _imports(m, p)} for m, p in MODULES.items()}


def test_every_import_is_allowed_by_the_layering():
    bad = []
    for module, targets in GRAPH.items():
        part = _part(module)
        if part in TOOLS:
            continue
        assert part in ALLOWED, f"{module}: a new part; give it its place in ALLOWED and docs/architecture.md"
        for t in targets:
            if _part(t) != part and _part(t) not in ALLOWED[part]:
                bad.append(f"{module} imports {t}")
    assert not bad, "imports the layering does not allow (docs/architecture.md):\n" + "\n".join(bad)


def test_no_part_imports_the_tools_on_top():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts if _part(t) in TOOLS and _part(m) not in TOOLS]
    assert not bad, bad


def test_there_is_no_import_cycle():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_imports_inside_functions_say_why():
    """An import inside a function hides an edge of the graph; it needs a comment saying why, on its line or above
    the block of consecutive imports it belongs to."""
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in tree.body:
            if isinstance(node, (ast.If, ast.Try)):
                top |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            i = node.lineno - 1
            if "#" in lines[i]:
                continue
            while i > 0 and (not lines[i - 1].strip() or lines[i - 1].strip().startswith(("import ", "from "))):
                i -= 1  # up through the block of imports (and blank lines between them)
            if not (i > 0 and lines[i - 1].strip().startswith("#")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "imports inside functions without a comment saying why:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m) in GENERIC))
def test_generic_modules_do_not_name_an_editor(module):
    source = MODULES[module].read_text()
    specific = [t for t in GRAPH[module] if t.startswith("algs.")]
    assert not specific, f"{module} imports {specific}: generic code reaches editors through algs.editor_class"
    names = "|".join(EDITOR_NAMES)
    code = code_of(source)
    # (``layout == "rome"`` is fact_eval's output layout named after ROME's case files, not the editor)
    compared = re.findall(
        rf"""(?<!layout )(?:==|!=|\bin)\s*\(?\s*["']({names})["']|\.alg\s*(?:==|!=)\s*["'](\w+)["']""", code
    )
    assert not compared, f"{module} branches on an editor's name: {compared}"
    assert not re.search(rf"\b({'|'.join(EDITOR_CLASSES)})\(", code), f"{module} constructs a named editor"
    settings = editor_settings_named(code)
    assert not settings, f"{module} names an editor's settings {settings}: they live in algs/<name>/__init__.py"


def code_of(source: str) -> str:
    """``source`` without its comments and docstrings (prose may cite an editor's keys; code may not)."""
    lines = [line.split("#")[0] for line in source.splitlines()]
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                for i in range(body[0].lineno - 1, body[0].end_lineno):
                    lines[i] = ""
    return "\n".join(lines)


def editor_settings_named(code: str) -> list:
    """Where ``code`` names a registered editor's settings: its group (``cfg.mend``, ``config["mend"]``), one of its
    keys (``"mend.rank"``, ``mend__rank``) or its settings class (``MendConfig``)."""
    names, classes = "|".join(EDITOR_NAMES), "|".join(SETTINGS_CLASSES)
    pattern = rf"""\.({names})\b|\[\s*["']({names})["']\s*\]|\b({names})(\.|__)\w|\b({classes})\b"""
    return [m.group(0) for m in re.finditer(pattern, code)]


def test_the_settings_check_finds_an_editors_settings():
    for code in ("r = cfg.mend.rank", 'OmegaConf.select(cfg, "efk.lr")', "x = config['enn']", "ENNConfig()",
                 "make(ft__lr=1)"):  # fmt: skip
        assert editor_settings_named(code), code
    for code in ("from algs import editor_class", 'project = "mend"', "mend-repro", "MEND_CACHE_DIR", "fmt"):
        assert not editor_settings_named(code), code


def test_no_file_is_too_long_to_read():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_demo_schedule_comes_with_the_embedded_model_and_yields_to_the_command_line():
    from config_schema import compose_config

    demo = compose_config(["+alg=mend", "+experiment=gen", "+model=smollm2"])
    assert (demo.max_iters, demo.mend.lr, demo.model.name) == (400, 1e-6, "embedded:smollm2-135m")
    assert compose_config(["+model=smollm2", "+alg=mend", "+experiment=gen", "max_iters=7"]).max_iters == 7
    fc = compose_config(["+alg=efk", "+experiment=fc", "+model=minilm"])
    assert (fc.max_iters, fc.efk.lr, fc.model.kind) == (600, 1e-4, "classifier")
    plain = compose_config(["+alg=mend", "+experiment=gen", "+model=distilgpt2"])
    assert (plain.max_iters, plain.accumulate_bs) == (500000, 10)  # the paper's, untouched by any schedule


def test_the_package_installs_every_module_of_the_project():
    """``pip install -e .`` makes the top-level modules importable from anywhere only if pyproject lists them all."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = [p.relative_to(ROOT) for p in _source_files()]
    modules = sorted(p.stem for p in files if len(p.parts) == 1)
    packages = sorted(".".join(p.parent.parts) for p in files if p.name == "__init__.py")
    assert sorted(project["py-modules"]) == modules
    found = setuptools.find_packages(str(ROOT), include=project["packages"]["find"]["include"])
    assert sorted(found) == packages
