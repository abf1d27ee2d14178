"""The data readers on mutated files: TSV and JSONL text splits, chat JSONL, generate's
prompts JSONL, IDX files (headers forged) and IDX folders. Each returns data or raises
one-line DKError; never another exception."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
from fuzzlib import accepted_or_dkerror, cases, mutated_bytes
from hypothesis import given
from hypothesis import strategies as st

from darkknowledge.blackbox.generate import load_prompts
from darkknowledge.blackbox.recipe import GenerateRecipe
from darkknowledge.data.vision import load_idx_folder, read_idx
from darkknowledge.families import validate_family
from darkknowledge.hf.text_data import read_split
from darkknowledge.lm.data import read_jsonl

TMP = Path(tempfile.mkdtemp(prefix="dk-fuzz-data-"))
DATA_TOKENS = ["\t", "\n", "\r", '"', "{", "}", "[", "]", ",", ":", "label", "sentence",
               "text", "-1", "1.5", "99999999999999999999", "null", "true", "\x00", "é",
               '{"a": ' * 30, "]" * 30, "\\u0000", "\\ud800"]  # fmt: skip

TSV = b"sentence\tlabel\na fine film\t1\na dull film\t0\nquite good\t1\n"
JSONL = b"".join(
    json.dumps(r).encode() + b"\n"
    for r in [
        {"sentence": "a fine film", "label": 1, "prompt": "2+2?", "response": "4",
         "question": "2+2?", "answer": "#### 4"},
        {"sentence": "a dull film", "label": 0, "prompt": "3+3?", "response": "6",
         "question": "3+3?", "answer": "#### 6"},
    ]
)  # fmt: skip


def _idx(arr: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


IMAGES = _idx(np.arange(3 * 4 * 4).reshape(3, 4, 4) % 255)
LABELS = _idx(np.array([0, 1, 2]))


def test_the_fixtures_are_valid():
    (TMP / "ok.tsv").write_bytes(TSV)
    (TMP / "ok.jsonl").write_bytes(JSONL)
    assert len(read_split(TMP / "ok.tsv")) == 3 and len(read_split(TMP / "ok.jsonl")) == 2
    assert len(read_jsonl(TMP / "ok.jsonl", "prompt", "response")) == 2
    assert read_idx(_write("ok-idx", IMAGES)).shape == (3, 4, 4)


def _write(name: str, data: bytes) -> Path:
    f = TMP / name
    f.write_bytes(data)
    return f


@cases(80)
@given(data=st.data())
def test_tsv(data):
    f = _write("d.tsv", data.draw(mutated_bytes(TSV, DATA_TOKENS)))
    accepted_or_dkerror(read_split, f)


@cases(80)
@given(data=st.data())
def test_jsonl_text_split(data):
    f = _write("d.jsonl", data.draw(mutated_bytes(JSONL, DATA_TOKENS)))
    accepted_or_dkerror(read_split, f)


@cases(60)
@given(data=st.data())
def test_chat_jsonl(data):
    f = _write("chat.jsonl", data.draw(mutated_bytes(JSONL, DATA_TOKENS)))
    accepted_or_dkerror(read_jsonl, f, "prompt", "response")


@cases(60)
@given(data=st.data(), template=st.sampled_from(["{question}", "Q: {question}\nA:", "{0}",
       "{question.x}", "{question[0]}", "{", "{nope}", "{question!r}", "{question:>999}"]))  # fmt: skip
def test_generate_prompts(data, template):
    f = _write("p.jsonl", data.draw(mutated_bytes(JSONL, DATA_TOKENS)))
    body = {
        "family": "generate",
        "prompts": {"path": str(f), "template": template},
        "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
    }

    def validate_and_load():  # a bad template is refused when the recipe is validated
        _, rec = validate_family(body, base_dir=f.parent, source="g.yaml")
        assert isinstance(rec, GenerateRecipe)
        return load_prompts(rec)

    accepted_or_dkerror(validate_and_load)


@st.composite
def forged_idx(draw) -> bytes:
    base = bytearray(draw(st.sampled_from([IMAGES, LABELS])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["byte", "dim", "cut", "extend"]))
        if op == "byte" and len(base) >= 4:  # magic, dtype code, ndim
            i = draw(st.integers(0, 3))
            base[i] = draw(st.sampled_from([0, 1, 3, 8, 9, 0x0B, 0x0C, 0x0D, 0x0E, 0xFF]))
        elif op == "dim" and len(base) >= 8:
            nd = max(1, (len(base) - 4) // 4)
            i = 4 + 4 * draw(st.integers(0, min(base[3], nd) - 1 if base[3] else 0))
            v = draw(st.sampled_from([0, 1, 2, 3, 4, 2**16, 2**31 - 1, 2**32 - 1]))
            base[i : i + 4] = v.to_bytes(4, "big")
        elif op == "cut":
            del base[draw(st.integers(0, len(base))) :]
        else:
            base += bytes(draw(st.integers(1, 64)))
    raw = bytes(base)
    return gzip.compress(raw) if draw(st.booleans()) else raw


@cases(80)
@given(raw=forged_idx())
def test_idx_file(raw):
    accepted_or_dkerror(read_idx, _write("x-idx", raw))


@cases(60)
@given(raw=forged_idx(), which=st.integers(0, 3), gz=st.booleans())
def test_idx_folder(raw, which, gz):
    folder = TMP / "idx"
    folder.mkdir(exist_ok=True)
    for p in folder.iterdir():
        p.unlink()
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]  # fmt: skip
    for i, name in enumerate(names):
        data = raw if i == which else (IMAGES if "images" in name else LABELS)
        (folder / (name + (".gz" if gz and i == which else ""))).write_bytes(data)
    accepted_or_dkerror(load_idx_folder, folder)
