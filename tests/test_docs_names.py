"""The docs name only what exists; the README's count of CUDA tests is the real count.

Where names are read: docs/architecture.md, README.md, tests/README.md, and the module docstring of
every file under moekit/. What is checked, by these rules and no others:

1. A backticked span `moekit.a.b.c`: the longest importable prefix is imported, the rest is got by getattr.
2. A backticked span `Class.attr` whose first part starts with a capital letter and a lowercase one
   (`Engine.load`, `DecoderLM.forward`): some module of moekit defines `class Class`, and `attr` is an
   attribute of it or is assigned or annotated in its body (`self.attr = ...`, `attr: int`).
3. A backticked span with a slash and a file suffix (.py .md .sh .c .h .json, `*` globs allowed):
   it exists relative to the repository root, else to moekit/, else to benchmarks/.
4. In the package map of docs/architecture.md (its first code block), each `file.py` sets the current
   module (the folder is the nearest package of moekit written as `folder/` at a line's start);
   every identifier after it on the same line that starts with a capital and holds a lowercase letter
   (`MoELayer`, `GGUFExperts`; not `Q4_K`, `LRU`, `Time-MoE`) is an attribute of that module.
5. Without backticks too: every `moekit.a.b` written in any of these texts resolves as in rule 1, and
   every file name `x.py` (or `folder/x.py`) in a module docstring exists beside that module, in its
   parent folder, in moekit/, at the repository root or in benchmarks/.

Names outside moekit (torch, transformers, gguf-py ...) are not checked; EXTERNAL lists the few the
rules above would otherwise take for ours.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/architecture.md", "README.md", "tests/README.md"]
# Deliberately external names that rule 2 or 4 would take for moekit's:
EXTERNAL = {
    "Module.to_empty",  # torch.nn.Module
    "AdamW",  # torch.optim.AdamW, beside train/loop.py
    "JiuZhang",  # the paper, beside moe/task_routing.py
}
SUFFIXES = (".py", ".md", ".sh", ".c", ".h", ".json")
CAMEL = re.compile(r"(?<![\w-])[A-Z]\w*[a-z]\w*(?![\w-])")


def _texts():
    """(where, text) for every doc and every moekit module docstring."""
    for doc in DOCS:
        yield doc, (ROOT / doc).read_text()
    for path in sorted((ROOT / "moekit").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        yield str(path.relative_to(ROOT)), docstring or ""


def _spans():
    return [(where, m.group(1)) for where, text in _texts() for m in re.finditer(r"`([^`\n]+)`", text)]


def _resolve_dotted(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _classes():
    """{class name: [(module name, ast.ClassDef)]} over every module of moekit."""
    found = {}
    for path in sorted((ROOT / "moekit").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append((module, node))
    return found


def _class_has(module, node, attr):
    cls = getattr(importlib.import_module(module), node.name, None)
    if cls is not None and hasattr(cls, attr):
        return True
    for sub in ast.walk(node):
        target = sub.target if isinstance(sub, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == attr:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr == attr and isinstance(sub.ctx, ast.Store):
            return True
    return False


def _path_exists(span):
    for base in (ROOT, ROOT / "moekit", ROOT / "benchmarks"):
        if list(base.glob(span)) if "*" in span else (base / span).exists():
            return True
    return False


def test_backticked_moekit_names_and_paths_exist():
    classes = _classes()
    missing = []
    for where, span in _spans():
        if span in EXTERNAL:
            continue
        if re.fullmatch(r"moekit(\.\w+)+", span):
            ok = _resolve_dotted(span)
        elif re.fullmatch(r"[A-Z][a-z]\w*\.\w+", span):
            name, attr = span.split(".")
            ok = any(_class_has(mod, node, attr) for mod, node in classes.get(name, []))
        elif "/" in span and span.endswith(SUFFIXES) and re.fullmatch(r"[\w./*-]+", span):
            ok = _path_exists(span)
        else:
            continue
        if not ok:
            missing.append(f"{where}: `{span}`")
    assert not missing, "named but missing:\n" + "\n".join(missing)


def _package_map():
    text = (ROOT / "docs/architecture.md").read_text()
    return text.split("```")[1].splitlines()


def test_architecture_package_map_names_live_in_their_files():
    folder, missing, checked = "", [], 0
    for line in _package_map():
        start = re.match(r"\s*([a-z_]+)/\s", line)
        if start and (ROOT / "moekit" / start.group(1)).is_dir():
            folder = start.group(1) + "/"
        for i, piece in enumerate(re.split(r"([\w]+\.py)\b", line)):
            if i % 2 == 1:
                module_path = ROOT / "moekit" / (folder if (ROOT / "moekit" / folder / piece).exists() else "") / piece
                assert module_path.exists(), f"package map names {folder}{piece}, which does not exist"
                module = importlib.import_module(
                    ".".join(module_path.relative_to(ROOT).with_suffix("").parts))
            elif i > 0:
                for name in CAMEL.findall(piece):
                    checked += 1
                    if name not in EXTERNAL and not hasattr(module, name):
                        missing.append(f"{module.__name__}.{name}")
    assert checked > 20  # the rule still reads the map
    assert not missing, "the package map lists names its files lack: " + ", ".join(missing)


def _gpu_marked_tests():
    """Tests marked `gpu`: decorated functions and parameter sets (`marks=pytest.mark.gpu`); a module-wide
    `pytestmark = pytest.mark.gpu` counts each test function of its file."""
    count = 0
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text() if path.name != Path(__file__).name else ""  # this file only names the mark
        if re.search(r"^pytestmark\s*=.*pytest\.mark\.gpu\b", text, flags=re.M):
            count += len(re.findall(r"^def test_", text, flags=re.M))
            continue
        count += len(re.findall(r"^\s*@pytest\.mark\.gpu\b", text, flags=re.M))
        count += len(re.findall(r"marks=\[?pytest\.mark\.gpu\b", text))
    return count


def test_readme_states_the_number_of_cuda_tests():
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
             "nine": 9, "ten": 10}
    stated = re.search(r"its (\w+) CUDA tests?", (ROOT / "README.md").read_text())
    assert stated, "README.md must say how many CUDA tests there are ('its N CUDA tests')"
    number = words.get(stated.group(1), None) or int(stated.group(1))
    assert number == _gpu_marked_tests() > 0


def test_readme_says_where_training_runs():
    """The README's one statement names exactly the values fit's train.device accepts."""
    from moekit.train.loop import DEVICES

    text = " ".join((ROOT / "README.md").read_text().split())
    assert "Training runs where `train.device` says" in text
    sentence = text.split("Training runs where `train.device` says", 1)[1].split(", generation", 1)[0]
    assert set(re.findall(r"`(\w+)`", sentence)) == set(DEVICES)


@pytest.mark.parametrize("name", ["moekit.not_a_module", "moekit.infer.Engine.no_such_method"])
def test_the_dotted_rule_rejects_names_that_do_not_exist(name):
    assert not _resolve_dotted(name)


def test_the_dotted_rule_accepts_real_names():
    assert _resolve_dotted("moekit.infer.load.load") and _resolve_dotted("moekit.moe.routing.Routing")


def test_tests_readme_maps_every_test_file():
    named = set(re.findall(r"`tests/(test_\w+\.py)`", (ROOT / "tests/README.md").read_text()))
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert files - named == set(), "tests/README.md does not map these test files"


def test_plain_text_moekit_names_and_docstring_file_names_exist():
    missing = []
    for where, text in _texts():
        for m in re.finditer(r"(?<![\w/.])moekit(?:\.[A-Za-z_]\w*)+", text):
            if not _resolve_dotted(m.group(0)):
                missing.append(f"{where}: {m.group(0)}")
        if not where.startswith("moekit/"):
            continue
        here = ROOT / Path(where).parent
        for m in re.finditer(r"(?<![\w.*-])((?:\w+/)*[A-Za-z_]\w*\.py)\b", text):
            bases = (here, here.parent, ROOT / "moekit", ROOT, ROOT / "benchmarks")
            if not any((base / m.group(1)).exists() for base in bases):
                missing.append(f"{where}: {m.group(1)}")
    assert not missing, "named but missing:\n" + "\n".join(missing)
