"""The registry of perturbation methods (engine.record.methods): every declared method parses its own examples, its
algorithm's version is an int read without torch, a method registered there is parsed, listed and built like the
shipped ones, and no module outside the registry names a method."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import engine.record.methods as registry
from engine.errors import HieruiError
from engine.perturb.spec import parse_spec
from engine.record.methods import Memory, Method, methods
from engine.record.methods.grammar import SPARSITY

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_PACKAGE = ROOT / "engine" / "record" / "methods"


@pytest.mark.parametrize("declared", methods(), ids=lambda m: m.name)
def test_every_method_parses_its_examples(declared):
    assert declared.examples and declared.summary
    for example in (*declared.examples, *declared.self_check):
        spec = parse_spec(example)
        assert spec.method == declared.name and spec.declared == declared and str(spec) == example
    assert declared.apply.partition(":")[0].startswith("engine.perturb.")


def test_versions_are_ints_read_without_torch():
    code = (
        "import sys, json\n"
        "from engine.record.methods import methods\n"
        "from engine.perturb import cache\n"
        "versions = {m.name: m.version for m in methods() if m.algorithm}\n"
        "versions.update({a: cache.algorithm_version(a) for a in cache.algorithms()})\n"
        "print(json.dumps(versions)); print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    versions, torch_loaded = run.stdout.splitlines()
    versions = json.loads(versions)
    assert torch_loaded == "False"
    cached = {m.algorithm for m in methods() if m.algorithm}
    assert {"wanda", "sparsegpt", "magnitude", "similarity"} <= cached and "calibration" in versions
    assert all(type(v) is int and v >= 1 for v in versions.values()), versions


def test_a_bumped_version_is_read_at_once(monkeypatch):
    from engine.perturb import cache

    declared = registry.method("wanda")
    module = sys.modules[declared.declared_in]
    monkeypatch.setattr(module, "ALGORITHM_VERSION", module.ALGORITHM_VERSION + 1)
    assert declared.version == cache.algorithm_version("wanda") == module.ALGORITHM_VERSION


def _fake(**changes) -> Method:
    """A pruning method of the tests' own, built by `_build_fake` below."""
    values = dict(
        name="fakeprune",
        family="prune",
        grammar=SPARSITY,
        summary="the tests' own method",
        examples=("fakeprune:0.5",),
        apply=f"{__name__}:_build_fake",
        changes="nothing",
        calibrates=False,
        quick_calibration=True,
        streams=True,
        memory=Memory(per_weight=3, note="three bytes a weight"),
        self_check=("fakeprune:0.25",),
        describe=lambda details: f"fake: {details.get('fake')}",
    )
    return Method(**{**values, **changes})


def _build_fake(job):
    from engine.perturb.pair import clone_sharing

    job.report.details["fake"] = str(job.spec)
    return clone_sharing(job.dense)


@pytest.fixture
def fake(monkeypatch):
    declared = _fake()
    monkeypatch.setitem(registry.REGISTRY, declared.name, declared)
    return declared


def test_a_registered_method_is_parsed_and_listed(fake):
    from engine.perturb.spec import check_streamable, streamable
    from engine.record.settings import calib_samples_help, default_calibration

    spec = parse_spec(" FakePrune:2:4 ")
    assert (spec.method, spec.n, spec.m, spec.family, spec.declared) == ("fakeprune", 2, 4, "prune", fake)
    assert "fakeprune" in registry.names() and registry.method("fakeprune") is fake
    with pytest.raises(HieruiError, match=r"known: .*fakeprune") as info:
        parse_spec("nope:1")
    assert str(info.value).endswith(", none, fakeprune")
    with pytest.raises(HieruiError, match="'fakeprune' takes a sparsity"):
        parse_spec("fakeprune")
    assert "fakeprune" in streamable()
    check_streamable(["fakeprune:0.5"])
    # one spec of each pruning method, then their second ones
    assert registry.self_check_specs()[1:6] == (
        "magnitude:0.5",
        "wanda:0.5",
        "sparsegpt:0.5",
        "fakeprune:0.25",
        "wanda:2:4",
    )
    assert default_calibration("fakeprune").samples == 32 and "wanda/fakeprune" in calib_samples_help()


def test_a_registered_method_is_built_planned_and_described(fake, tiny):
    from engine.perturb import perturb
    from engine.run.plan import estimate

    pair = perturb(tiny, "fakeprune:0.5")
    assert pair.report.details["fake"] == "fakeprune:0.5" and pair.report.spec == "fakeprune:0.5"
    assert fake.describe(pair.report.details) == "fake: fakeprune:0.5"
    items = {i.name: i for i in estimate("tiny-random", ["fakeprune:0.5"], device="cpu", dtype="float32").items}
    work = items["pruning workspace (layer in flight)"]
    assert work.note == "three bytes a weight" and work.nbytes == 3 * 128 * 64  # the tiny model's largest matrix


def test_unknown_names_and_bad_declarations_are_refused():
    with pytest.raises(HieruiError, match="unknown method 'nope'; known: magnitude, wanda"):
        registry.method("nope")
    with pytest.raises(ValueError, match="changes must be one of"):
        _fake(changes="everything")


# ------------------------------------------------------------------ nothing outside the registry names a method

SPEC_CALLS = {"parse_spec", "Spec", "method", "find"}
SPEC_NAMES = {"method", "family"}
SPEC_PARAMETERS = {"spec", "specs", "method"}


def _names_a_method(value) -> bool:
    if not isinstance(value, str):
        return False
    head, colon, _ = value.partition(":")
    return head in registry.REGISTRY and (not colon or " " not in value)


def _strings(node) -> list:
    """The string constants of a literal: itself, or the elements of a tuple/list/set (also added together)."""
    if isinstance(node, ast.Constant):
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _strings(e)]
    if isinstance(node, ast.BinOp):
        return _strings(node.left) + _strings(node.right)
    if isinstance(node, ast.Dict):
        return [c for k in node.keys if k is not None for c in _strings(k)]
    return []


def _spec_like(node) -> bool:
    """An expression ending in `method` or `family`: spec.method, parsed.family, a variable called method."""
    return (isinstance(node, ast.Attribute) and node.attr in SPEC_NAMES) or (
        isinstance(node, ast.Name) and node.id in SPEC_NAMES
    )


def method_names_in(source: str) -> list[tuple[int, str]]:
    """(line, constant) of every place `source` names a method in code. A string constant names one when it is a
    registered method's name or a spec of one ('wanda:0.5') and it stands
      (a) in a comparison (==, !=, in, not in) with an expression ending in `method` or `family`, on its own or
          inside a tuple, list or set;
      (b) as a positional argument of parse_spec(), Spec(), method() or find();
      (c) in a module- or class-level assignment whose literal value (a tuple, list or set, the keys of a dict)
          holds string constants that all name methods, or is one string: a spec with its arguments, or any
          method's name when the name assigned says spec or method;
      (d) as the default of a parameter called spec, specs or method.
    Not counted: docstrings, messages and help texts, keyword arguments of library calls (bitsandbytes'
    quant_type="nf4"), keys of a report's details, and other vocabularies sharing a word (batch --attribute none)."""
    found = []
    tree = ast.parse(source)

    def flag(constants) -> None:
        found.extend((c.lineno, c.col_offset, c.value) for c in constants if _names_a_method(c.value))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_spec_like(o) for o in operands):
                flag(c for o in operands for c in _strings(o))
        elif isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if callee in SPEC_CALLS:
                flag(c for a in node.args for c in _strings(a))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            flag(c for a, d in pairs if a.arg in SPEC_PARAMETERS for c in _strings(d))
    for body in [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        for statement in body:
            value = statement.value if isinstance(statement, (ast.Assign, ast.AnnAssign)) else None
            constants = [c for c in _strings(value) if isinstance(c.value, str)] if value is not None else []
            if isinstance(value, ast.Constant):  # a lone string: a spec, or a name assigned as a method's
                targets = ast.unparse(statement.targets[0] if isinstance(statement, ast.Assign) else statement.target)
                said = any(word in targets.lower() for word in ("spec", "method"))
                constants = [c for c in constants if said or ":" in c.value]
            if constants and all(_names_a_method(c.value) for c in constants):
                flag(constants)
    return [(line, value) for line, _col, value in sorted(set(found))]


def test_the_scan_finds_each_way_of_naming_a_method():
    source = '''
STREAMABLE = ("magnitude", "wanda") + ("none",)
DEFAULT = "wanda:0.5"
KINDS = {"attndrop": "attention"}
CHOICES = ("none", "flips")  # another vocabulary: not counted
class C:
    QUICK = ("wanda",)
    attribute: str = "none"  # batch --attribute's vocabulary: not counted
    method: str = "none"
def f(spec="int8", other="nf4"):
    """Docstrings name int8 freely."""
    if spec.method == "checkpoint" or method in ("sparsegpt", "x"):
        return parse_spec("blockdrop:1"), dict(quant_type="nf4"), attribute == "none"
    return parsed.family in ("prune", "checkpoint"), f"--prune wanda:0.5", {"checkpoint": 1}
'''
    assert [value for _line, value in method_names_in(source)] == [
        "magnitude",
        "wanda",
        "none",
        "wanda:0.5",
        "attndrop",
        "wanda",
        "none",
        "int8",
        "checkpoint",
        "sparsegpt",
        "blockdrop:1",
        "checkpoint",
    ]


def test_no_module_outside_the_registry_names_a_method():
    offences = []
    for path in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("hierui/**/*.py")]):
        if REGISTRY_PACKAGE in path.parents:
            continue
        for line, value in method_names_in(path.read_text(encoding="utf-8")):
            offences.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert offences == [], "ask engine.record.methods instead of naming a method:\n" + "\n".join(offences)
