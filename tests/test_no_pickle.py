"""No code path of the package unpickles anything: a static scan of every module.

A checkpoint store is a file format that people hand to each other; unpickling is code
execution. The scan forbids the calls that unpickle (pickle/marshal/shelve/dill/joblib loads,
``Unpickler``), ``numpy.load`` without ``allow_pickle=False``, and any ``torch.load`` whose
``weights_only`` is not the literal ``True``.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deltackpt")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                      "joblib"}
UNPICKLING_CALLS = {"load", "loads", "Unpickler", "open"}


def _modules() -> list[str]:
    out = []
    for root, _, files in os.walk(PACKAGE):
        out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def problems_in(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    found = []
    aliases: dict[str, str] = {}  # local name -> module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module.split(".")[0] in UNPICKLING_MODULES and a.name in UNPICKLING_CALLS:
                    found.append(f"{filename}:{node.lineno}: imports {node.module}.{a.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        module = aliases.get(head, head)
        where = f"{filename}:{node.lineno}"
        if module.split(".")[0] in UNPICKLING_MODULES and last in UNPICKLING_CALLS:
            found.append(f"{where}: calls {name}")
        if last == "load" and module == "torch":
            wo = _keyword(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if last == "load" and module in ("numpy", "np"):
            ap = _keyword(node, "allow_pickle")
            if not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(f"{where}: numpy.load without allow_pickle=False")
    return found


def test_the_package_never_unpickles():
    problems = []
    for path in _modules():
        with open(path, encoding="utf-8") as f:
            problems += problems_in(f.read(), os.path.relpath(path, PACKAGE))
    assert not problems, "\n".join(problems)
    assert len(_modules()) > 20  # the scan saw the package


@pytest.mark.parametrize("source", [
    "import pickle\npickle.loads(b'')",
    "import pickle as p\np.load(f)",
    "from pickle import loads",
    "import torch\ntorch.load('x')",
    "import torch\ntorch.load('x', weights_only=False)",
    "import torch as t\nt.load('x', weights_only=flag)",
    "import numpy as np\nnp.load('x.npy')",
    "import marshal\nmarshal.loads(b'')",
])
def test_the_scan_catches_unpickling(source):
    assert problems_in(source, "m.py")


def test_the_scan_allows_safe_calls():
    ok = ("import pickle, torch, numpy as np\n"
          "try:\n    torch.load('x', map_location='cpu', weights_only=True)\n"
          "except pickle.UnpicklingError:\n    pass\n"
          "np.load('x.npy', allow_pickle=False)\n")
    assert problems_in(ok, "m.py") == []
