"""Student fine-tuning on SFT rows (loss on the response only) and evaluation by sampling:
pass@1 (mean correctness of k samples) and maj@k (majority vote of the k extracted answers).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import DKError

IGNORE = -100


def encode_pair(tok, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + response + EOS`` and labels with the prompt masked out
    (``-100``), so the loss is on the response (and its end) only."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + r)[:max_len]
    labels = ([IGNORE] * len(p) + r)[:max_len]
    return ids, labels


def _collate(batch, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    T = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, (i, lab) in enumerate(batch):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(i)] = 1
    return ids, labels, mask


def response_loss(model, ids: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over response positions; 0 (with a gradient) when a
    batch has none."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
    tgt = labels[:, 1:]  # (B, T-1)
    valid = tgt != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[valid], tgt[valid])


class SFTTask:
    """Chat SFT on (prompt, response) rows as an engine task: the loss is the mean
    next-token cross-entropy on the response tokens. Batches are a pure function of
    (seed, step): a seeded permutation per epoch."""

    def __init__(self, model, data, pad: int, batch_size: int, seed: int, check, log):
        self.trained = self.net = model
        self.data, self.pad, self.bs, self.seed = data, pad, batch_size, seed
        self.check, self.log = check, log
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        self.stat_names: tuple[str, ...] = ()
        self.losses: list[float] = []
        self.step = 0

    def micro_batches(self, step: int):
        self.step = step
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        idx = torch.randperm(len(self.data), generator=g)[k * self.bs : (k + 1) * self.bs]
        return [_collate([self.data[i] for i in idx.tolist()], self.pad)]

    def forward(self, mb) -> tuple[Tensor, dict]:
        ids, labels, mask = mb
        loss = response_loss(self.net, ids, labels, mask)
        self.losses.append(float(loss.detach()))
        if self.log and self.step % 100 == 0:
            self.log(self.step, self.losses[-1])
        return loss, {}

    def evaluate(self, step: int) -> dict:
        if self.check is None:
            return {}
        self.net.eval()
        return {"stop": bool(self.check(step))}

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])


def train_sft(
    model,
    tok,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 50,
    seed: int = 0,
    max_len: int = 256,
    log: Callable[[int, float], None] | None = None,
    check: Callable[[int], bool] | None = None,
    check_every: int = 200,
    folder=None,
    resume: bool = False,
) -> list[float]:
    """AdamW (weight decay 0.01) with warm-up and cosine decay over ``steps`` batches,
    through the engine. With ``check``, the rate stays constant after warm-up and
    training stops early when ``check(step)`` (called every ``check_every`` steps)
    returns True. ``folder``: checkpoints and metrics there (``resume`` continues).
    Returns the loss per step."""
    from ..config import TrainConfig
    from ..engine import train

    if not pairs:
        raise DKError(
            "no training rows: the SFT file is empty (did the verifier reject everything?)"
        )
    data = [encode_pair(tok, p, r, max_len) for p, r in pairs]
    torch.manual_seed(seed)
    cfg = TrainConfig(
        epochs=None,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.01,
        warmup=warmup,
        schedule="constant" if check is not None else "cosine",
        grad_clip=1.0,
        seed=seed,
        eval_every=check_every if check is not None else steps,
        checkpoint_every=check_every if folder is not None else None,
    )
    task = SFTTask(model, data, tok.pad_token_id, batch_size, seed, check, log)
    train(task, cfg, folder, resume=resume, desc="sft")
    model.eval()
    return task.losses


@torch.no_grad()
def sample(
    model,
    tok,
    prompts: Sequence[str],
    *,
    k: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """``k`` completions per prompt (greedy when ``temperature == 0``), left-padded batches."""
    model.eval()
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    flat = [p for p in prompts for _ in range(k)]
    texts: list[str] = []
    for s in range(0, len(flat), batch_size):
        chunk = [tok(p, add_special_tokens=False)["input_ids"] for p in flat[s : s + batch_size]]
        T = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for b, c in enumerate(chunk):
            ids[b, T - len(c) :] = torch.tensor(c)
            mask[b, T - len(c) :] = 1
        kw = (
            dict(do_sample=True, temperature=temperature, top_k=0)
            if temperature > 0
            else dict(do_sample=False)
        )
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            **kw,
        )
        for row in out[:, T:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(tok.decode(row))
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def pass_and_majority(verdicts: Sequence[Sequence[dict]]) -> dict:
    """pass@1 = mean over prompts of the fraction of correct samples; maj@k = share of
    prompts whose most frequent extracted answer is right (ties: first seen)."""
    if not verdicts:
        return {"pass@1": float("nan"), "maj@k": float("nan"), "k": 0, "prompts": 0}
    p1, maj = 0.0, 0
    for vs in verdicts:
        p1 += sum(v["correct"] for v in vs) / len(vs)
        preds = [v["predicted"] for v in vs if v["predicted"] is not None]
        if preds:
            top = Counter(preds).most_common(1)[0][0]
            maj += int(top == vs[0]["expected"])
    n = len(verdicts)
    return {"pass@1": p1 / n, "maj@k": maj / n, "k": len(verdicts[0]), "prompts": n}


def evaluate(
    model,
    tok,
    rows: Sequence[dict],
    verify,
    *,
    k: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict:
    """pass@1 and maj@k of a local model on rows ``{prompt, reference}``."""
    outs = sample(
        model,
        tok,
        [r["prompt"] for r in rows],
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    verdicts = [
        [verify(t, r["reference"]).to_dict() for t in ts] for ts, r in zip(outs, rows, strict=True)
    ]
    return pass_and_majority(verdicts)
