"""The shape a reader relies on (README "The training loop"): every training script shows its own loop,
`diff train_at.py train_<method>.py` shows the method and little else, common.py stays readable in
one sitting, and the code cites the paper and the README only."""
import ast
import difflib
import importlib.util
import io
import tokenize

import pytest

from conftest import ROOT

SCRIPTS = ["train_at.py", "train_trades.py", "train_mart.py", "train_awp.py", "train_misc.py"]


def code_lines(path):
    """The file's code without comments, docstrings and blank lines (what 'code-only diff' counts)."""
    source = (ROOT / path).read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    kept = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER) or tok.start[0] in docstrings:
            continue
        for line in range(tok.start[0], tok.end[0] + 1):
            kept.setdefault(line, True)
    lines = source.splitlines()
    return [lines[i - 1].split("  #")[0].rstrip() for i in sorted(kept)]


def diff_size(a, b):
    """Lines removed + added by `diff a b` on the code-only files."""
    return sum(1 for l in difflib.ndiff(code_lines(a), code_lines(b)) if l[:1] in "+-")


@pytest.mark.parametrize("script,limit", [("train_trades.py", 50), ("train_mart.py", 50), ("train_awp.py", 90)])
def test_code_only_diff_with_train_at_is_the_method(script, limit):
    assert diff_size("train_at.py", script) <= limit


def test_common_does_not_grow():
    """common.py holds only what several scripts use (README "Files"): 776 lines with one architecture and one
    data set; 979 with the three architectures of README "Architectures", the three data sets of README "Data"
    and the paper's BN weight decay and cyclic momentum (every script builds models and loads data); 1,099 with
    what every script's user meets (progress lines in log files, Ctrl-C, pixel-unit flags, a CUDA out-of-memory
    line), the ℓ2 threat model and attacks chunked by --batch-size (checkpoint loading, used by evaluate.py
    alone, lives there). Its budget is about 1,000 lines: this guards against regrowth."""
    assert len((ROOT / "common.py").read_text().splitlines()) <= 1099


def test_code_cites_the_paper_and_readme_not_the_team_spec():
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    team_doc = "SP" + "EC"  # spelt apart so that this file passes its own check
    assert not [f.name for f in files if team_doc in f.read_text()]


def loop_of(script):
    """main()'s epoch loop (the `while epoch < args.epochs` statement)."""
    tree = ast.parse((ROOT / script).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return next(n for n in ast.walk(main) if isinstance(n, ast.While))


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_shows_the_protocol_in_order(script):
    """In every script's loop, visible and in this order: the training steps, the test metrics, the EMA
    BN re-estimation, the early-stopping check, the checkpoint writes; the loop calls its own file's
    train_step."""
    loop = ast.unparse(loop_of(script))
    order = ["train_step(", "common.epoch_metrics(net, x_log", "common.reestimate_bn(",
             "common.epoch_metrics(es_model, x_es", "es['es_rerr'] < best['es_rerr']", "common.save_epoch("]
    positions = [loop.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    source = (ROOT / script).read_text()
    assert "def train_step(" in source or "TRAIN_STEPS = " in source


def test_train_misc_loop_has_no_method_branches():
    loop = loop_of("train_misc.py")
    assert not [n for n in ast.walk(loop) if isinstance(n, ast.Attribute) and n.attr == "method"]


def test_every_mutant_still_applies_and_names_existing_tests():
    """scripts/mutants.py's table stays in step with the code (its own check, run here so that a refactor which
    makes a mutant stale turns the suite red, not only the slow mutation check): each mutant's original text
    exactly once in its file, every test it names existing, no name twice."""
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    assert mutants.table_problems(ROOT) == []
