"""What the fuzz tests share: the oracle, the mutation strategies, the valid fixtures.

The oracle: an input is either accepted, or refused with a :class:`DKError` (one line,
no newline in the message) / exit status 2 with one ``error: ...`` line / a 4xx from
the service; any other exception, exit status or a 5xx fails the test."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from darkknowledge.cli import main
from darkknowledge.errors import DKError

ROOT = Path(__file__).resolve().parents[2]

# fixed seed, no example database (nothing written outside tmp folders), no flaky
# deadline on a loaded 2-core machine (a hang still fails: see conftest.py's alarm)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=False,
)  # fmt: skip


def cases(n: int):
    """``n`` examples under the suite's settings."""
    return settings(FUZZ, max_examples=n)


# ---------------------------------------------------------------- the oracle


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``dk ARGV`` in this process: (exit status, stderr). Anything but a DKError
    escaping ``main`` (a traceback) propagates and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: an override that starts with '-' is an option
            rc = e.code
            assert rc == 2 and err.getvalue().startswith("usage: dk"), (rc, err.getvalue())
            return rc, "error: " + err.getvalue().splitlines()[-1] + "\n"
    return rc, err.getvalue()


def assert_cli_ok_or_one_line(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err, err


def accepted_or_dkerror(fn, *args, **kw) -> Any:
    """``fn(*args)``; a DKError must be one line. Returns the result or the error."""
    try:
        return fn(*args, **kw)
    except DKError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return e


def assert_http_ok_or_4xx(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        detail = r.json().get("detail")
        if isinstance(detail, str):  # ours: one line; FastAPI's own 422 is a list
            assert "\n" not in detail, detail


# ---------------------------------------------------------------- mutations

TOKENS = [
    "&a ", "*a", "<<: *a\n", "[", "]", "{", "}", ":", ": ", "- ", "\t", "\x00", "\x1b",
    "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a}", "!!map",
    "? ", "---\n", "...\n", "'", '"', "\\", "\n", "  ", "%YAML 1.1\n", "~", "null",
    ".inf", "-.inf", ".nan", "-1", "0", "1e400", "0x1F", "0o17", "2001-12-14", "yes",
    "99999999999999999999999999", "é", "\u2028", "\ufeff", "#", "|\n", ">-\n", "@", "`",
    "%", "&", "*", "!", ",", "family: text\n", "family: generate\n", "family: causal_lm\n",
]  # fmt: skip
RAW = [b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\x00\x00"]


@st.composite
def mutated_bytes(draw, base: bytes, tokens: list[str] = TOKENS, max_ops: int = 6) -> bytes:
    """``base`` with a few byte-level edits: insert a token, delete or duplicate a span,
    cut the tail, or swap two lines."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["insert", "insert", "delete", "dup", "cut", "swap", "raw"]))
        n = len(data)
        i = draw(st.integers(0, n))
        if op == "insert":
            tok = draw(st.one_of(st.sampled_from(tokens), st.text(max_size=8)))
            data[i:i] = tok.encode("utf-8", "surrogatepass")
        elif op == "raw":
            data[i:i] = draw(st.sampled_from(RAW))
        elif op == "delete" and n:
            j = draw(st.integers(i, min(n, i + 12)))
            del data[i:j]
        elif op == "dup" and n:
            j = draw(st.integers(i, min(n, i + 40)))
            data[i:i] = data[i:j]
        elif op == "cut":
            del data[i:]
        elif op == "swap":
            lines = bytes(data).split(b"\n")
            if len(lines) > 1:
                a = draw(st.integers(0, len(lines) - 1))
                b = draw(st.integers(0, len(lines) - 1))
                lines[a], lines[b] = lines[b], lines[a]
                data = bytearray(b"\n".join(lines))
    return bytes(data)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "digits",
            "mlp",
            "idx",
            "../../etc",
            "/etc/passwd",
            "dataset:x",
            "tiny:tiny-bert",
            "char",
            "token",
            "x" * 300,
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


def paths_of(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict/list (for structured mutations)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths_of(v, (*prefix, i))
    return out


@st.composite
def mutated_tree(draw, base: dict, max_ops: int = 3) -> Any:
    """``base`` (a deep copy) with a few values replaced, keys dropped or added."""
    import copy

    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_ops))):
        paths = paths_of(data)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["set", "set", "drop", "add"]))
        if not path:
            if op == "add" and isinstance(data, dict):
                data[draw(st.text(max_size=8))] = draw(json_values)
            continue
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        if op == "set":
            parent[last] = draw(json_values)
        elif op == "drop":
            if isinstance(parent, dict):
                parent.pop(last, None)
            elif isinstance(parent, list) and parent:
                parent.pop(last)
        elif isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=8))] = draw(json_values)
    return data


def yaml_dump(obj: Any) -> bytes:
    return yaml.safe_dump(obj, allow_unicode=True, sort_keys=False).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- valid fixtures


def absolutise(obj: Any, base: Path) -> Any:
    """Relative ``path`` values made absolute (the recipe is rewritten in a tmp folder)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "path" and isinstance(v, str) and not Path(v).is_absolute():
                v = str((base / v).resolve())
            out[k] = absolutise(v, base)
        return out
    if isinstance(obj, list):
        return [absolutise(v, base) for v in obj]
    return obj


RECIPES = {
    "classify": ROOT / "recipes" / "cnn-ensemble_to_mlp256_digits.yaml",
    "text": ROOT / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml",
    "causal_lm": ROOT / "recipes" / "lm" / "shakespeare_char_fkl.yaml",
    "generate": ROOT / "recipes" / "blackbox" / "arith_generate.yaml",
}


def recipe_fixture(family: str) -> dict:
    """The shipped recipe, its ``extends:`` bases merged in, paths made absolute."""
    from darkknowledge.recipe_io import read_recipe

    path = RECIPES[family]
    return absolutise(read_recipe(path), path.parent)
