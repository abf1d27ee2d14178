"""LM data: plain text cut into blocks, and prompt/response rows with chat templates.

A batch is ``input_ids (B, T)``, ``attention_mask (B, T)`` and ``labels (B, T)``, where
``labels[b, t]`` is the token that position t must predict (already shifted) or −100
(prompt, padding: no loss). Teacher and student each get their own batch rendering (their
own chat template) of the same examples; the positions with a label are the response
tokens, the same tokens in the same order for both, so the loss pairs them row by row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DKError

IGNORE = -100


@dataclass
class LMBatch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T), −100 where no loss
    ids: Tensor | None = None  # (B,) example ids (fixed blocks / chat rows): store lookups
    # chat rows joined to a store of sampled responses: how many leading response
    # positions of each row the store has signals for (the rest: CE only)
    kd_len: Tensor | None = None  # (B,)

    @property
    def valid(self) -> Tensor:
        return self.labels != IGNORE  # (B, T)

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DKError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise DKError(f"{path}: the text file is empty")
    return text


_LONE_NEWLINE = re.compile(r"(?<=[^\n])\n(?=[^\n])")


def tokenize_text(tokenizer, text: str, piece: int = 1 << 16) -> Tensor:
    """Token ids of a long text, tokenised in pieces of about ``piece`` characters.

    One call on a whole 1 MB text makes the fast tokenizer hold per-token strings and
    offsets for all of it (≈ 0.5 GB); pieces keep that to a few MB. Pieces end just after
    a lone newline (text on both sides), where byte-level BPE (GPT-2) and character
    tokenizers give the same ids as on the whole text (tested).
    """
    parts, start, n = [], 0, len(text)
    while start < n:
        end = min(start + piece, n)
        if end < n:
            cuts = [m.end() for m in _LONE_NEWLINE.finditer(text, start, end)]
            if cuts and cuts[-1] > start:
                end = cuts[-1]
        ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.long))
        start = end
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class TextBlocks:
    """Token ids of a text, split into a training part (random blocks) and a validation
    part (consecutive blocks)."""

    def __init__(self, ids: Tensor, block_size: int, val_fraction: float, val_blocks: int | None):
        self.block = block_size
        n_val = int(len(ids) * val_fraction)
        self.train_ids, self.val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
        for name, part in (("training", self.train_ids), ("validation", self.val_ids)):
            if len(part) < block_size + 2:
                raise DKError(
                    f"text data: the {name} part has {len(part)} tokens, fewer than "
                    f"block_size + 2 = {block_size + 2}; lower data.block_size or val_fraction"
                )
        n_blocks = (len(self.val_ids) - 1) // block_size
        self.n_val_blocks = min(n_blocks, val_blocks) if val_blocks else n_blocks

    @classmethod
    def from_text(cls, text: str, tokenizer, block_size, val_fraction, val_blocks):
        return cls(tokenize_text(tokenizer, text), block_size, val_fraction, val_blocks)

    def offsets(self, gen: torch.Generator, n: int) -> Tensor:
        return torch.randint(0, len(self.train_ids) - self.block - 1, (n,), generator=gen)

    def batch_at(self, offsets: Tensor, ids: Tensor | None = None) -> LMBatch:
        data = self.train_ids if ids is None else ids
        idx = offsets[:, None] + torch.arange(self.block + 1)[None, :]  # (B, T+1)
        seq = data[idx]
        x, y = seq[:, :-1], seq[:, 1:]
        return LMBatch(x, torch.ones_like(x), y.clone())

    @property
    def n_blocks(self) -> int:
        """Fixed, non-overlapping training blocks (``sampling: blocks``; what a store labels)."""
        return (len(self.train_ids) - 1) // self.block

    def block_batch(self, block_ids: Tensor) -> LMBatch:
        """The fixed blocks ``block_ids (B,)``: block i starts at token i·block_size."""
        b = self.batch_at(block_ids * self.block)
        b.ids = block_ids.clone()
        return b

    def val_batches(self, batch_size: int):
        starts = torch.arange(self.n_val_blocks) * self.block
        for i in range(0, len(starts), batch_size):
            yield self.batch_at(starts[i : i + batch_size], self.val_ids)


# ---------------------------------------------------------------- chat data


Prompt = str | list[dict]  # a prompt string, or the conversation before the answer


def _turns(v, where: str, field: str) -> list[dict]:
    """``v`` as a list of ``{role, content}`` messages with string values."""
    if not isinstance(v, list) or not v:
        raise DKError(f"{where}: {field!r} must be a non-empty list of messages")
    for m in v:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise DKError(f"{where}: {field!r}: every message needs a string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def read_chat(path: Path, prompt_key: str, response_key: str) -> list[tuple[Prompt, str]]:
    """(prompt, response) rows of a chat data file of any format :mod:`darkknowledge.rows`
    reads (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, a ``save_to_disk``
    folder) in one of three forms, told apart by the first row (or the columns) and then
    required of every row:

    - ``prompt_key``/``response_key`` strings (``dk generate``'s ``select.format:
      response``);
    - ``messages`` (TRL's conversational form): the last turn, an assistant turn, is the
      response, the turns before it (system turn included) the prompt;
    - ``prompt_key``/``completion`` (TRL's prompt-completion form): strings, or message
      lists (the completion one assistant turn).
    """
    from ..rows import iter_rows, pick

    def select(cols: list[str], where: str) -> list[str]:  # columnar files: what to read
        if response_key in cols:
            return pick(cols, where, [prompt_key, response_key])
        if "messages" in cols:
            return ["messages"]
        return pick(cols, where, [prompt_key, "completion"])

    rows: list[tuple[Prompt, str]] = []
    form = None
    for where, rec in iter_rows(path, select):
        if form is None:
            if response_key in rec:
                form, r_key = "response", response_key
            elif "messages" in rec:
                form = "messages"
            elif "completion" in rec:
                form, r_key = "completion", "completion"
            else:
                raise DKError(
                    f"{where}: no {response_key!r} (data.response_key), 'messages' or "
                    "'completion' field: not a prompt/response, messages or "
                    "prompt/completion row"
                )
        if form == "messages":
            if "messages" not in rec:
                raise DKError(f"{where}: no 'messages' field (the file's first row has one)")
            turns = _turns(rec["messages"], where, "messages")
            if turns[-1]["role"] != "assistant" or len(turns) < 2:
                raise DKError(
                    f"{where}: 'messages' must end with an assistant turn (the response) "
                    "after at least one turn (the prompt)"
                )
            rows.append((turns[:-1], turns[-1]["content"]))
            continue
        p, r = rec.get(prompt_key), rec.get(r_key)
        if r is None and form == "response" and "messages" in rec:
            raise DKError(f"{where}: a 'messages' row in a file of {response_key!r} rows")
        if isinstance(p, list):
            p = _turns(p, where, prompt_key)
        elif not isinstance(p, str):
            raise DKError(f"{where}: missing string (or message list) field {prompt_key!r}")
        if isinstance(r, list) and form == "completion":
            turns = _turns(r, where, r_key)
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise DKError(f"{where}: {r_key!r} must be one assistant turn")
            r = turns[0]["content"]
        elif not isinstance(r, str):
            raise DKError(f"{where}: missing string field {r_key!r}")
        rows.append((p, r))
    if not rows:
        raise DKError(f"{path}: no examples")
    return rows


read_jsonl = read_chat  # its name when JSONL was the only format


def read_keys(path: Path, id_key: str, sample_key: str) -> list[tuple[str, int]]:
    """Each row's (prompt id, sample index), the key a store of sampled responses uses."""
    from ..rows import iter_rows

    def select(cols: list[str], where: str) -> list[str]:
        if id_key not in cols:
            raise DKError(
                f"{where}: no prompt id column {id_key!r} (data.id_key) to join the store by"
            )
        return [id_key, *([sample_key] if sample_key in cols else [])]

    keys = []
    for where, rec in iter_rows(path, select):
        pid, smp = rec.get(id_key), rec.get(sample_key, 0)
        if isinstance(smp, str) and smp.strip().isdigit():  # CSV / TSV: every value is text
            smp = int(smp)
        if not isinstance(pid, str | int) or isinstance(pid, bool):
            raise DKError(f"{where}: no prompt id {id_key!r} (data.id_key) to join the store by")
        if not isinstance(smp, int) or isinstance(smp, bool) or smp < 0:
            raise DKError(f"{where}: {sample_key!r} (data.sample_key) must be a sample index ≥ 0")
        keys.append((str(pid), smp))
    return keys


def render(tokenizer, prompt: Prompt, response: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of one example and the number of prompt tokens.

    ``prompt`` is a string (one user turn) or the conversation before the response (a
    list of ``{role, content}`` messages, a system turn included). With a chat template:
    the prompt is the template with a generation prompt, the response is what the full
    conversation adds to it. Without one: the prompt text (a conversation's contents
    joined by newlines, as ``dk serve-teacher`` feeds them), then the response and EOS.
    BOS is prepended when the tokenizer asks for it (``add_bos_token``) and the rendering
    does not start with it — the same rule for teacher and student.
    """
    tok = tokenizer
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tok, "chat_template", None):
        p_txt = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [*turns, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(p_txt):
            raise DKError(
                "chat template: the rendered conversation does not start with the rendered "
                "prompt, so the response tokens cannot be found"
            )
        r_txt = full[len(p_txt) :]
        p_ids = tok(p_txt, add_special_tokens=False)["input_ids"]
        r_ids = tok(r_txt, add_special_tokens=False)["input_ids"]
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in turns)
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            r_ids = [*r_ids, tok.eos_token_id]
    if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
        if not p_ids or p_ids[0] != tok.bos_token_id:
            p_ids = [tok.bos_token_id, *p_ids]
    ids = (p_ids + r_ids)[:max_length]
    return ids, min(len(p_ids), len(ids))


@dataclass
class ChatExample:
    ids: list[int]
    n_prompt: int
    truncated: bool = False


def encode_chat(
    rows: list[tuple[Prompt, str]], tokenizer, max_length: int, where: str
) -> list[ChatExample]:
    out = []
    for i, (p, r) in enumerate(rows):
        ids, n_prompt = render(tokenizer, p, r, max_length + 1)
        full, _ = render(tokenizer, p, r, 1 << 30)
        if len(ids) - n_prompt < 1:
            raise DKError(
                f"{where}: example {i + 1}: no response tokens left within max_length "
                f"{max_length} (the prompt alone has {n_prompt} tokens); raise data.max_length"
            )
        out.append(ChatExample(ids, n_prompt, len(full) > len(ids)))
    return out


def collate(examples: list[ChatExample], pad_id: int) -> LMBatch:
    """Right-padded batch; labels on response tokens only."""
    t = max(len(e.ids) for e in examples) - 1
    b = len(examples)
    x = torch.full((b, t), pad_id, dtype=torch.long)
    am = torch.zeros((b, t), dtype=torch.long)
    y = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(ids) - 1
        x[i, :n], am[i, :n] = ids[:-1], 1
        lab = ids[1:].clone()
        lab[: max(e.n_prompt - 1, 0)] = IGNORE  # position t predicts token t+1
        y[i, :n] = lab
    return LMBatch(x, am, y)


class ChatSet:
    """Prompt/response examples rendered for the student and (separately) the teacher."""

    def __init__(self, student: list[ChatExample], teacher: list[ChatExample] | None):
        self.student, self.teacher = student, teacher
        if teacher is not None:
            for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
                rs, rt = s.ids[s.n_prompt :], t.ids[t.n_prompt :]
                n = min(len(rs), len(rt))  # max_length may cut one rendering earlier
                cut_ok = (len(rs) == n or t.truncated) and (len(rt) == n or s.truncated)
                if rs[:n] != rt[:n] or not cut_ok:
                    raise DKError(
                        f"chat data: example {i + 1}: teacher and student tokenise the "
                        "response differently (their chat templates render the assistant "
                        "turn differently); token-level KD needs the same response "
                        "tokens: give both the same chat template"
                    )
                s.ids, t.ids = s.ids[: s.n_prompt + n], t.ids[: t.n_prompt + n]

    def __len__(self) -> int:
        return len(self.student)
