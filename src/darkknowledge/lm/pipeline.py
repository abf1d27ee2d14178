"""``dk run`` for ``causal_lm`` recipes: tokenizer → models → pre-flight → (teacher
training) → student training (plain CE, token KD, GKD or sequence-level KD) → saved
models and a report.

Run folder::

    OUT/config.yaml           the resolved recipe (resume refuses a different one)
    OUT/preflight.json        what the pre-flight check found (vocab, memory estimate)
    OUT/teacher/model/        the trained teacher (save_pretrained + tokenizer)
    OUT/[seed_<s>/]student/   metrics.jsonl, checkpoint.pt while training,
                              model/ (save_pretrained + tokenizer), result.json
    OUT/report.json

Training is resumable: a checkpoint (weights, optimizer, step) is written atomically
every ``train.checkpoint_every`` steps; the batches of step s depend only on (seed, s),
so a resumed run sees the same data as an uninterrupted one. A finished phase (a
``result.json``) is skipped.

Under ``accelerate launch`` / ``torchrun`` (:mod:`darkknowledge.dist`) the same run is
split over the processes: every process draws the step's micro-batches, keeps its
contiguous rows of each, and divides each micro-batch's summed token loss by the
*global* count of valid tokens of the step (all-reduced over processes and
micro-batches); DDP averages the gradients, so the update is the one-process update.
Process 0 alone writes files. ``teacher.placement: shard`` shards the frozen teacher
over the processes (FSDP2) instead of replicating it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import dist as ddist
from .. import faults
from ..engine import checkpoint as engine_ckpt
from ..engine import train as engine_train
from ..engine.rundir import prepare_run_dir
from ..errors import DKError
from ..hf import io as hfio
from ..losses.sampled import SampledTarget
from ..recipe_io import dump_recipe
from ..store.format import atomic_write_bytes
from ..store.label_folder import prepare_label_folder
from . import models as M
from .data import (
    IGNORE,
    ChatExample,
    ChatSet,
    LMBatch,
    TextBlocks,
    collate,
    encode_chat,
    read_chat,
    read_keys,
    read_text,
)
from .losses import HeadTeacher, TokenLoss, chunked_head_loss
from .preflight import preflight
from .recipe import ChatData, DistillSpec, LMRecipe, TextData, TinyModel

CKPT = engine_ckpt.NAME
Tensor = torch.Tensor


# ---------------------------------------------------------------- set-up


class HiddenStates(torch.nn.Module):
    """``model``'s body as a module: ``(input_ids, attention_mask)`` → final hidden
    states. What DDP wraps (the LM head is applied outside, chunk by chunk) and the root
    of a sharded teacher."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return M.final_hidden(self.model, input_ids, attention_mask)


def _rows(b: LMBatch | None, p: Tensor) -> LMBatch | None:
    """Rows ``p`` of a batch (this process's part of a micro-batch)."""
    if b is None:
        return None
    ids = b.ids[p] if b.ids is not None else None
    kd_len = b.kd_len[p] if b.kd_len is not None else None
    return LMBatch(b.input_ids[p], b.attention_mask[p], b.labels[p], ids, kd_len)


def load_tokenizers(recipe: LMRecipe):
    """(student tokenizer, teacher tokenizer or None, text or None)."""
    text = read_text(recipe.data.path) if isinstance(recipe.data, TextData) else None
    spec = recipe.tokenizer
    if spec is not None and spec.kind == "char":
        tok = hfio.char_tokenizer(text)
        s_tok = t_tok = tok
    elif spec is not None:
        s_tok = t_tok = hfio.load_tokenizer(spec.path)
    else:
        s_tok = hfio.load_tokenizer(recipe.student.model.path)
        t_tok = None
        for i, m in enumerate(recipe.teacher_members()):
            tok = hfio.load_tokenizer(m.model.path)
            if t_tok is None:
                t_tok = tok
            elif tok.get_vocab() != t_tok.get_vocab():
                raise DKError(
                    f"teacher.members.{i}: its vocabulary differs from member 0's; an "
                    "ensemble averages next-token distributions over one shared vocabulary"
                )
    for tok in {id(s_tok): s_tok, id(t_tok): t_tok}.values():
        if tok is not None and tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # padding is masked; EOS is the usual stand-in
    return s_tok, (t_tok if _model_teacher(recipe) else None), text


def _model_teacher(recipe: LMRecipe):
    """The recipe's teacher spec when it is a network (a model or an ensemble of them;
    None: no teacher, or a store)."""
    return recipe.teacher if recipe.teacher_members() else None


def _member_folder(recipe: LMRecipe, out: Path, i: int) -> Path:
    """Where teacher model ``i`` is trained: ``teacher/`` (one), ``teacher/member_i/``."""
    if getattr(recipe.teacher, "kind", None) == "ensemble":
        return out / "teacher" / f"member_{i}"
    return out / "teacher"


def _as_teacher(recipe: LMRecipe, models: list):
    """One model, or the ensemble of the members (vocabulary sizes checked)."""
    if getattr(recipe.teacher, "kind", None) != "ensemble":
        return models[0]
    sizes = [M.vocab_size(m) for m in models]
    for i, v in enumerate(sizes):
        if v != sizes[0]:
            raise DKError(
                f"teacher.members.{i}: {v} outputs, member 0 has {sizes[0]}; an ensemble "
                "averages next-token distributions over one shared vocabulary"
            )
    tc = recipe.teacher
    return M.LMEnsemble(models, tc.weights, tc.combine).eval()


def build_model(spec, tok, seed: int):
    """A causal LM: a tiny one from its config (vocabulary = the tokenizer's) or a folder."""
    if isinstance(spec, TinyModel):
        over = dict(spec.config)
        over.setdefault("vocab_size", len(tok))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tok, key, None) is not None:
                over.setdefault(key, getattr(tok, key))
        if spec.tiny == "tiny-gpt2":
            for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
                over.setdefault(key, spec.dropout)
        return hfio.build_tiny(spec.tiny, "AutoModelForCausalLM", seed=seed, **over)
    return hfio.load_model(spec.path, "AutoModelForCausalLM")


def apply_lora(model, lora, seed: int):
    try:
        import peft
    except ModuleNotFoundError:
        raise DKError("LoRA students need peft: pip install 'darkknowledge[lora]'") from None
    cfg = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:
        raise DKError(f"student.lora: {str(e).splitlines()[0]}") from None


class Data:
    """The recipe's data, tokenised for the student (and the teacher)."""

    def __init__(self, recipe: LMRecipe, s_tok, t_tok, text: str | None):
        d = recipe.data
        self.text: TextBlocks | None = None
        self.train: ChatSet | None = None
        self.val: ChatSet | None = None
        self.s_pad = s_tok.pad_token_id
        self.t_pad = t_tok.pad_token_id if t_tok is not None else None
        self.blocks = isinstance(d, TextData) and d.sampling == "blocks"
        if isinstance(d, TextData):
            self.text = TextBlocks.from_text(
                text, s_tok, d.block_size, d.val_fraction, d.val_blocks
            )
            self.max_length = d.block_size
            return
        assert isinstance(d, ChatData)
        rows = read_chat(d.train, d.prompt_key, d.response_key)
        if d.val is not None:
            val_rows = read_chat(d.val, d.prompt_key, d.response_key)
        else:
            n_val = max(1, int(len(rows) * d.val_fraction))
            if n_val >= len(rows):
                raise DKError(f"{d.train}: too few examples ({len(rows)}) to hold out a val part")
            rows, val_rows = rows[:-n_val], rows[-n_val:]
        self.max_length = d.max_length
        # a store of sampled responses: each training row's key, then (open_token_store)
        # its store example id and how many response positions the store covers
        self.train_keys: list[tuple[str, int]] | None = None
        self.store_rows: Tensor | None = None
        self.store_len: Tensor | None = None
        self.store_coverage = 1.0
        if getattr(recipe.teacher, "kind", None) == "store":
            self.train_keys = read_keys(d.train, d.id_key, d.sample_key)[: len(rows)]

        def enc(rs, where):
            s = encode_chat(rs, s_tok, d.max_length, where)
            t = encode_chat(rs, t_tok, d.max_length, where) if t_tok is not None else None
            return ChatSet(s, t)

        self.train = enc(rows, str(d.train))
        self.val = enc(val_rows, str(d.val or d.train))

    @property
    def chat(self) -> bool:
        return self.text is None

    def steps_per_epoch(self, batch_size: int, accum: int) -> int:
        """Optimizer steps that see about every training example (block) once."""
        n = len(self.train) if self.text is None else len(self.text.train_ids) // self.text.block
        return max(n // (batch_size * accum), 1)

    def batches(self, seed: int, step: int, batch_size: int, accum: int):
        """The micro-batches of one step: (student batch, teacher batch or None) pairs."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        out = []
        for m in range(accum):
            if self.text is not None and self.blocks:  # the fixed blocks, an order per epoch
                n = self.text.n_blocks
                per_epoch = max(n // batch_size, 1)
                epoch, k = divmod(step * accum + m, per_epoch)
                g = torch.Generator().manual_seed(seed * 7919 + epoch)
                idx = torch.randperm(n, generator=g)[k * batch_size : (k + 1) * batch_size]
                out.append((self.text.block_batch(idx), None))
                continue
            if self.text is not None:
                b = self.text.batch_at(self.text.offsets(gen, batch_size))
                out.append((b, None))
                continue
            n = len(self.train)
            per_epoch = max(n // batch_size, 1)
            epoch, k = divmod(step * accum + m, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            idx = perm[k * batch_size : (k + 1) * batch_size].tolist()
            s = collate([self.train.student[i] for i in idx], self.s_pad)
            if self.store_rows is not None:
                s.ids, s.kd_len = self.store_rows[idx], self.store_len[idx]
            t = (
                collate([self.train.teacher[i] for i in idx], self.t_pad)
                if self.train.teacher is not None
                else None
            )
            out.append((s, t))
        return out, gen

    def val_batches(self, batch_size: int, teacher: bool = False):
        if self.text is not None:
            yield from self.text.val_batches(batch_size)
            return
        exs = self.val.teacher if teacher else self.val.student
        pad = self.t_pad if teacher else self.s_pad
        for i in range(0, len(exs), batch_size):
            yield collate(exs[i : i + batch_size], pad)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def val_loss(
    model,
    data: Data,
    batch_size: int = 32,
    chunk: int = 1024,
    teacher: bool = False,
    root=None,
):
    """Mean next-token cross-entropy (nats) over the validation tokens.

    Several processes take turns over the batches. ``root``: the FSDP root of a sharded
    ``model`` (:func:`darkknowledge.dist.shard_for_training`); its forward gathers the
    parameters, so every process then runs the same number of forwards (a process
    without a batch in the last round repeats the first one, uncounted)."""
    was = model.training
    model.eval()
    st = ddist.state()
    dev = st.device if root is not None else next(model.parameters()).device
    total, count = 0.0, 0
    batches = list(data.val_batches(batch_size, teacher))
    for r in range(math.ceil(len(batches) / st.world)):
        i = r * st.world + st.rank  # several processes: each its share of the batches
        if i >= len(batches) and root is None:
            break
        batch = batches[i] if i < len(batches) else batches[0]
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        if isinstance(model, M.LMEnsemble):  # the combined logits, whole
            valid = batch.valid.to(dev)
            logits = model(ids, mask).logits[valid]
            total += float(F.cross_entropy(logits, batch.labels.to(dev)[valid], reduction="sum"))
            count += int(valid.sum())
            continue
        h = root(ids, mask) if root is not None else M.final_hidden(model, ids, mask)
        if i >= len(batches):
            continue
        w, b = M.head(model)  # after the forward: a sharded model's head is gathered now
        valid = batch.valid.to(dev)
        rows, labels = h[valid], batch.labels.to(dev)[valid]
        for lo in range(0, len(rows), chunk):
            logits = F.linear(rows[lo : lo + chunk], w, b).float()
            total += float(F.cross_entropy(logits, labels[lo : lo + chunk], reduction="sum"))
        count += len(rows)
    if root is not None:
        root.reshard()
    if st.world > 1:
        total, count = ddist.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
        total, count = float(total), int(count)
    model.train(was)
    return total / max(count, 1)


# ---------------------------------------------------------------- training


@torch.no_grad()
def sample_continuations(model, prompts: Tensor, gen_tokens: int, temperature: float, seed: int):
    """Sampled continuations ``(B, P + G)`` of ``prompts (B, P)`` (no padding)."""
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = M.unwrap(model).generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            max_new_tokens=gen_tokens,
            min_new_tokens=gen_tokens,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=M.unwrap(model).config.eos_token_id,
        )
    model.train(was)
    return out


def stop_ids(model, tok) -> list[int]:
    """The tokens that end a response: the tokenizer's end-of-sequence token and those of
    the model's generation config (a chat template's end-of-turn token, e.g.)."""
    ids = [tok.eos_token_id]
    g = getattr(M.unwrap(model), "generation_config", None)
    e = getattr(g, "eos_token_id", None)
    ids += e if isinstance(e, list) else [e]
    return list(dict.fromkeys(i for i in ids if i is not None))


def sample_responses(
    model, prompts: list[list[int]], max_new: int, temperature: float, seed: int,
    stops: list[int],
) -> list[list[int]]:  # fmt: skip
    """One sampled response per prompt (prompts of any lengths, generated together,
    left-padded), each cut after its first stop token (kept) or at ``max_new`` tokens."""
    width = max(len(p) for p in prompts)
    ctx = hfio.positions(M.unwrap(model).config)
    if ctx:  # within the model's positions, prompt included
        if width >= ctx:
            raise DKError(
                f"gkd: a prompt of {width} tokens leaves no room in the student's "
                f"{ctx} positions for a response; lower data.max_length"
            )
        max_new = min(max_new, ctx - width)
    eos = stops[0]
    x = torch.full((len(prompts), width), eos, dtype=torch.long)
    am = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, width - len(p) :], am[i, width - len(p) :] = torch.tensor(p), 1
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = M.unwrap(model).generate(
            input_ids=x.to(dev),
            attention_mask=am.to(dev),
            do_sample=True,
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=stops,
            pad_token_id=eos,
        )
    model.train(was)
    res = []
    for row in out[:, width:].tolist():
        end = next((j for j, i in enumerate(row) if i in stops), None)
        res.append(row if end is None else row[: end + 1])
    return res


def _prompt_ids(b: LMBatch) -> list[list[int]]:
    """Each row's prompt: its tokens up to the first one with a label (chat rows)."""
    first = b.valid.long().argmax(1).tolist()  # position p predicts response token 1
    return [b.input_ids[i, : p + 1].tolist() for i, p in enumerate(first)]


def _chat_on_policy(s: LMBatch, t: LMBatch | None, resp: list[list[int]], pads) -> tuple:
    """The micro-batch's rows with their responses replaced by the sampled ones: the
    student's prompt rendering (and the teacher's, when it renders its own) + the same
    response tokens, labels on those tokens only."""

    def batch(b: LMBatch, pad: int) -> LMBatch:
        rows = [ChatExample(p + r, len(p)) for p, r in zip(_prompt_ids(b), resp, strict=True)]
        return collate(rows, pad)

    return batch(s, pads[0]), None if t is None else batch(t, pads[1])


def _continuation_batch(seq: Tensor, n_prompt: int) -> LMBatch:
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, : n_prompt - 1] = IGNORE
    return LMBatch(x, torch.ones_like(x), y)


class LMTask:
    """The causal_lm family's task for the engine: one model's training run in
    ``folder`` (teacher pre-training or a student). The chunked LM head
    (:func:`.losses.chunked_head_loss`) and GKD's sampling (:meth:`_step_batches`) are
    its hooks; the loop is the engine's."""

    def __init__(
        self,
        model,
        tok,
        data: Data,
        cfg,
        dist: DistillSpec,
        folder: Path,
        teacher=None,
        seqkd: Tensor | None = None,
        desc: str = "train",
        teacher_root=None,
        store=None,
        served=None,
    ):
        self.store = store  # a StoreTeacher: the teacher's signals looked up by block id
        self.served = served  # an EchoScorer: a served teacher scores the batch's tokens
        self.model, self.tok, self.data, self.cfg, self.dist = model, tok, data, cfg, dist
        self.folder, self.teacher, self.seqkd, self.desc = folder, teacher, seqkd, desc
        # a sharded teacher: the FSDP root whose forward gives its hidden states
        self.teacher_root = teacher_root
        self.dev = next(model.parameters()).device
        st = ddist.state()
        self.world, self.rank, self.main = st.world, st.rank, st.is_main
        # several processes: the student's body under DDP (the head is applied outside
        # its forward, chunk by chunk), or sharded by FSDP2 into one unit per block and a
        # root unit (embeddings, final norm, head) left gathered after its forward
        self.fsdp = st.fsdp  # also with one process (accelerate launch --use_fsdp)
        self.net = None
        if self.fsdp:
            self.net = ddist.shard_for_training(HiddenStates(model), ddist.blocks_of(model))
            with torch.no_grad():  # the root's forward runs first: it sets FSDP's root up
                one = torch.ones(1, 1, dtype=torch.long, device=st.device)
                model.eval()  # (no dropout draws: the RNG stream is the unsharded run's)
                self.net(one, one)
                model.train()
            self.net.reshard()
        elif self.world > 1:
            self.net = ddist.wrap(HiddenStates(model), ddp_only=True)
        else:
            self.net = HiddenStates(model)
        self.trained = model  # what the optimizer takes and the checkpoint holds
        self.stat_names = ("on_policy", "kd", "ce")  # kd, ce: the loss's two terms
        self.steps_per_epoch = data.steps_per_epoch(cfg.batch_size, cfg.grad_accum)
        self.on_policy_steps, self.last_val = 0, float("nan")
        ls = dist.loss
        if dist.mode in ("none", "seqkd"):
            self.spec = TokenLoss(kd_weight=0.0, ce_weight=1.0)
        else:
            self.spec = TokenLoss(
                ls.kind, ls.temperature, ls.beta, ls.skew, ls.kd_weight, ls.ce_weight
            )
        # on-policy batches have no ground truth: the divergence alone
        self.on_policy_spec = TokenLoss(ls.kind, ls.temperature, ls.beta, ls.skew, 1.0, 0.0)
        self.autocast = cfg.dtype == "bf16"

    def _step_batches(self, step: int):
        """The step's micro-batches, this process's rows of each (all rows in one process)."""
        cfg, d = self.cfg, self.dist
        batches, gen = self.data.batches(cfg.seed, step, cfg.batch_size, cfg.grad_accum)
        on_policy = False
        if self.seqkd is not None:
            rows = torch.randint(
                0, len(self.seqkd), (cfg.batch_size * cfg.grad_accum,), generator=gen
            )
            batches = [
                (_continuation_batch(self.seqkd[r], d.prompt_tokens), None)
                for r in rows.split(cfg.batch_size)
            ]
        if self.world > 1:  # contiguous rows of every micro-batch (the same draw everywhere)
            batches = [
                (_rows(s, p), _rows(t, p))
                for s, t in batches
                for p in [ddist.shard(torch.arange(s.input_ids.shape[0]))]
            ]
        if (
            self.seqkd is None
            and d.mode == "gkd"
            and float(torch.rand((), generator=gen)) < d.lmbda
        ):
            on_policy = True
            new = []
            # each process samples its own prompts' continuations; its own seed (the
            # same seed would repeat samples), so on-policy steps differ from one process
            rank_seed = 0 if self.world == 1 else 7_919_993 * (self.rank + 1)
            with self._gathered():
                for m, (b, t) in enumerate(batches):
                    seed = cfg.seed * 1_000_003 + step * 17 + m + rank_seed
                    if self.data.chat:  # the rows' prompts, a sampled response each
                        resp = sample_responses(
                            self.model, _prompt_ids(b), d.gen_tokens, d.sample_temperature,
                            seed, stop_ids(self.model, self.tok),
                        )  # fmt: skip
                        pads = (self.data.s_pad, self.data.t_pad)
                        new.append(_chat_on_policy(b, t, resp, pads))
                        continue
                    prompts = b.input_ids[:, : d.prompt_tokens].to(self.dev)
                    seq = sample_continuations(
                        self.model,
                        prompts,
                        d.gen_tokens,
                        d.sample_temperature,
                        seed=seed,
                    )
                    new.append((_continuation_batch(seq.cpu(), d.prompt_tokens), None))
            batches = new
        return batches, on_policy

    @contextlib.contextmanager
    def _gathered(self):
        """A sharded student's root unit gathered (generation calls the whole model, not
        the root; the blocks gather themselves). Every process generates the same number
        of tokens, so the blocks' all-gathers stay in step."""
        if not self.fsdp:
            yield
            return
        self.net.unshard()
        try:
            yield
        finally:
            self.net.reshard()

    def _val_loss(self) -> float:
        return val_loss(self.model, self.data, root=self.net if self.fsdp else None)

    def _stored_target(self, s: LMBatch, valid: Tensor):
        """The teacher's stored signals at the batch's labelled positions: dense logits
        (dense and head stores) or top-k ids, log-probs and tail mass, rows in the order
        of the student's valid positions; and which valid positions have one (None: all).

        A store of sampled responses (chat rows, ``s.kd_len`` set) holds response
        positions only: the k-th labelled position of a row is the store's position k,
        for k below the row's ``kd_len`` (where the row's tokens still agree with the
        sampled ones); later positions get no teacher signal."""
        from ..signals import Batch

        sig = self.store.signals(Batch(s.input_ids, None, s.ids))
        valid = valid.cpu()
        have = None
        if s.kd_len is not None:
            k = valid.long().cumsum(1) - 1  # (B, T): the response position of each label
            have = valid & (k < s.kd_len[:, None])  # (B, T)
            t_store = sig.mask.shape[1]
            b_idx, t_idx = have.nonzero(as_tuple=True)
            at = (b_idx, k[b_idx, t_idx].clamp_max(t_store - 1))
            sel = have[valid]  # (n,): which valid positions have a signal
            have = sel if not bool(sel.all()) else None
            ids = sig.topk_ids[at].to(self.dev)
            lp = sig.topk_logprobs[at].to(self.dev)
            tail = sig.tail_mass[at].to(self.dev)

            def target(lo, hi):
                return ids[lo:hi], lp[lo:hi], tail[lo:hi]

            return target, have
        if sig.logits is not None:
            t = sig.logits[valid].to(self.dev)  # (n, V)

            def target(lo, hi):
                return t[lo:hi]
        elif sig.sampled_ids is not None:  # drawn ids and their weights count / draws
            sids = sig.sampled_ids[valid].to(self.dev)  # (n, K)
            w = sig.sampled_weights[valid].to(self.dev)

            def target(lo, hi):
                return SampledTarget(sids[lo:hi], w[lo:hi])
        else:
            ids = sig.topk_ids[valid].to(self.dev)  # (n, K)
            lp = sig.topk_logprobs[valid].to(self.dev)
            tail = sig.tail_mass[valid].to(self.dev)  # (n,)

            def target(lo, hi):
                return ids[lo:hi], lp[lo:hi], tail[lo:hi]

        return target, None

    def _served_target(self, s: LMBatch):
        """The served teacher's top-k + tail at the batch's labelled positions (its rows,
        or the student's sampled answers on an on-policy step), scored through echo."""
        from ..blackbox.echo import batch_target

        ids, lp, tail = (x.to(self.dev) for x in batch_target(
            self.served, s.input_ids, s.labels, s.valid))  # fmt: skip

        def target(lo, hi):
            return ids[lo:hi], lp[lo:hi], tail[lo:hi]

        return target

    def plain_model(self):
        """The trained model, whole (on every process: collective under FSDP)."""
        if not self.fsdp:
            return self.model
        return hfio.whole_copy(M.unwrap(self.model), ddist.full_state_dict(self.model))

    def _micro_loss(self, s, t, spec: TokenLoss, norm: float, parts: dict) -> Tensor:
        dev = self.dev
        body = self.net
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            h = body(s.input_ids.to(dev), s.attention_mask.to(dev))
            valid = s.valid.to(dev)
            rows, labels = h[valid], s.labels.to(dev)[valid]
            target, have = None, None
            if self.store is not None and spec.kd_weight > 0:
                target, have = self._stored_target(s, valid)
                if have is not None:  # some positions have no stored signal: CE only there
                    return self._split_loss(rows, labels, target, have.to(dev), spec, norm, parts)
            if self.served is not None and spec.kd_weight > 0:
                target = self._served_target(s)
            if self.teacher is not None and spec.kd_weight > 0:
                tb = t if t is not None else s
                ens = self.teacher if isinstance(self.teacher, M.LMEnsemble) else None
                models = list(ens.members) if ens is not None else [self.teacher]
                ths, heads = [], []
                for tm in models:
                    t_body = self.teacher_root or HiddenStates(tm)
                    with torch.no_grad():
                        th = t_body(tb.input_ids.to(dev), tb.attention_mask.to(dev))
                        ths.append(th[tb.valid.to(dev)])
                    heads.append(M.head(tm))
                if ths[0].shape[0] != rows.shape[0]:
                    raise DKError(
                        f"teacher and student batches have {ths[0].shape[0]} and "
                        f"{rows.shape[0]} labelled positions; they must render the same "
                        "response tokens"
                    )
                # the teacher's logits: a chunk at a time, inside the loss
                target = HeadTeacher(ths, heads, ens.combine if ens is not None else None)

            loss = chunked_head_loss(
                rows,
                *M.head(self.model),
                spec,
                labels=labels,
                teacher=target,
                normalizer=norm,
                chunk=self.dist.chunk,
                parts=parts,
            )
        if target is not None and self.teacher_root is not None:
            self.teacher_root.reshard()  # the sharded teacher's head was only needed here
        return loss

    def _split_loss(self, rows, labels, target, have, spec: TokenLoss, norm, parts) -> Tensor:
        """KD + CE on the positions with a stored signal, CE alone on the others."""
        head = M.head(self.model)
        kd_parts: dict = {}
        loss = chunked_head_loss(
            rows[have], *head, spec, labels=labels[have], teacher=target,
            normalizer=norm, chunk=self.dist.chunk, parts=kd_parts,
        )  # fmt: skip
        ce_parts = {"ce": 0.0, "tokens": 0}
        if spec.ce_weight > 0 and bool((~have).any()):
            ce_spec = dataclasses.replace(spec, kd_weight=0.0)
            loss = loss + chunked_head_loss(
                rows[~have], *head, ce_spec, labels=labels[~have],
                normalizer=norm, chunk=self.dist.chunk, parts=ce_parts,
            )  # fmt: skip
        parts.update(
            kd=kd_parts.get("kd", 0.0),
            ce=kd_parts.get("ce", 0.0) + ce_parts["ce"],
            tokens=kd_parts.get("tokens", 0) + ce_parts["tokens"],
        )
        return loss

    # ---- the engine's Task: micro-batches, forward, evaluation, state

    def micro_batches(self, step: int) -> list:
        batches, on_policy = self._step_batches(step)
        self.on_policy_steps += on_policy
        spec = self.on_policy_spec if on_policy else self.spec
        norm = sum(b.n_valid for b, _ in batches)
        if self.world > 1:  # the step's valid tokens over all processes
            norm = float(ddist.all_reduce_sum(torch.tensor([float(norm)], dtype=torch.float64)))
        # summed over micro-batches and processes, the stat is 1 on an on-policy step
        self._on_policy = float(on_policy) / (self.world * len(batches))
        return [(s, t, spec, norm) for s, t in batches]

    def forward(self, mb) -> tuple[Tensor, dict]:
        s, t, spec, norm = mb
        parts: dict = {}
        loss = self._micro_loss(s, t, spec, norm, parts)
        kd, ce = parts.get("kd", 0.0) * spec.kd_weight, parts.get("ce", 0.0) * spec.ce_weight
        return loss, {"on_policy": self._on_policy, "kd": kd, "ce": ce}

    def evaluate(self, step: int) -> dict:
        self.last_val = self._val_loss()
        return {"val_loss": self.last_val}

    def state_dict(self) -> dict:
        return {"on_policy_steps": self.on_policy_steps}

    def load_state_dict(self, state: dict) -> None:
        self.on_policy_steps = int(state["on_policy_steps"])

    def fit(self, resume: bool) -> dict:
        """Train through the engine; the run's result (val loss, steps, wall time)."""
        if self.main:
            self.folder.mkdir(parents=True, exist_ok=True)
        # fresh_seed: the dropout stream starts from the seed, not from whatever this
        # process did before (a teacher trained here, or loaded after a restart)
        res = engine_train(
            self, self.cfg, self.folder, resume=resume, desc=self.desc, fresh_seed=self.cfg.seed
        )
        return {
            "val_loss": self.last_val,
            "steps": res.steps,
            "resumed_from": res.resumed_from,
            "wall_s": res.wall_s,
            "on_policy_steps": self.on_policy_steps,
            "processes": self.world,
        } | ({"fsdp": True} if self.fsdp else {})


def save_model(model, tok, folder: Path) -> Path:
    """save_pretrained + tokenizer; a LoRA student is merged first (servable as is).

    The tokenizer's ``model_max_length`` and the generation config's ``max_length`` are
    the positions the model was trained on. A GPT-2 model is saved with its learned
    position table widened (:func:`hfio.widen_learned_positions`), so ``generate`` in
    plain transformers runs past the trained positions instead of raising IndexError."""
    m = model
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    n = hfio.positions(m.config)
    m = hfio.widen_learned_positions(m) or m
    gen = getattr(m, "generation_config", None)
    before = getattr(gen, "max_length", None)
    if n and gen is not None:
        gen.max_length = n
    try:
        return hfio.save_pretrained(m, folder, tok)
    finally:
        if gen is not None:
            gen.max_length = before  # the model in memory keeps its own


def _model_name(spec) -> str:
    if isinstance(spec, TinyModel):
        return f"{spec.tiny} {json.dumps(dict(spec.config), separators=(',', ':'))}"
    return str(spec.path)


def student_card(recipe: LMRecipe, folder: Path, result: dict, model) -> Path:
    """``README.md`` beside a saved causal_lm student: teacher, recipe, data, metrics."""
    from ..export import write_card

    t = recipe.teacher
    if t is None:
        teacher = "none (trained on the data alone)"
    elif t.kind == "store":
        teacher = f"signal store {t.path}"
    elif t.kind == "api":
        name = repr(t.model) if t.model else "named by DK_TEACHER_MODEL"
        teacher = f"a served model ({name}), its top {t.top_logprobs} scored through echo"
    elif t.kind == "ensemble":
        names = ", ".join(_model_name(m.model) for m in t.members)
        teacher = f"an ensemble ({t.combine}) of {names}"
    else:
        teacher = _model_name(t.model)
    n = hfio.positions(model.config)
    notes = []
    if n:
        notes.append(f"The model takes {n} token positions (the tokenizer's model_max_length).")
        if getattr(model.config, "model_type", "") == "gpt2" and n < hfio.GENERATE_POSITIONS:
            notes.append(
                f"It was trained on {n} positions. Its learned position table is saved "
                f"widened to {hfio.GENERATE_POSITIONS} rows, the rows past {n} repeating "
                f"position {n - 1}, so generate() runs past {n} tokens instead of raising "
                "IndexError; text past the trained positions is untested."
            )
    loss = recipe.distill.loss.kind if recipe.distill.mode in ("token", "gkd") else None
    return write_card(
        folder,
        pipeline_tag="text-generation",
        recipe=recipe.name,
        family="causal_lm",
        teacher=teacher,
        data=f"{recipe.data.kind} "
        + str(recipe.data.path if isinstance(recipe.data, TextData) else recipe.data.train),
        facts={
            "student": _model_name(recipe.student.model),
            "distillation": recipe.distill.mode + (f" ({loss})" if loss else ""),
            "tokenizer": recipe.tokenizer.kind if recipe.tokenizer else "the student's own",
            "seed": result.get("seed"),
            "parameters": result.get("params"),
            "positions": n,
        },
        metrics={"validation loss (nats/token)": result.get("val_loss"),
                 "steps": result.get("steps")},
        notes=notes,
    )  # fmt: skip


def _finish(model, tok, result: dict, folder: Path, recipe: LMRecipe | None = None) -> dict:
    path = save_model(model, tok, folder / "model")
    if recipe is not None:  # a student: its model card
        student_card(recipe, path, result, model)
    faults.point("saved")
    result["model"] = str(path)
    # atomic: a kill never leaves half a result
    atomic_write_bytes(folder / "result.json", json.dumps(result, indent=2).encode())
    (folder / CKPT).unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------- phases


def teacher_phase(recipe: LMRecipe, tok, data: Data, out: Path, resume: bool):
    """The teacher: each model trained here once (plain CE) or loaded when already
    trained (or given as a folder); an ensemble's members combined."""
    models, infos = [], []
    members = recipe.teacher_members()
    for i, tc in enumerate(members):
        if tc.train is None:
            models.append(build_model(tc.model, tok, 0).eval())
            infos.append({"source": str(tc.model.path)})
            continue
        desc = "teacher" if len(members) == 1 else f"teacher member {i}"
        m, res = _train_teacher(tc, tok, data, _member_folder(recipe, out, i), resume, desc)
        models.append(m)
        infos.append(res)
    teacher = _as_teacher(recipe, models)
    if len(models) == 1:
        return teacher, infos[0]
    return teacher, {"members": infos, "combine": recipe.teacher.combine}


def _train_teacher(tc, tok, data: Data, folder: Path, resume: bool, desc: str):
    dev = ddist.default_device()
    done = folder / "result.json"
    if done.exists():
        model = hfio.load_model(folder / "model", "AutoModelForCausalLM").to(dev).eval()
        return model, json.loads(done.read_text())
    model = build_model(tc.model, tok, tc.train.seed).to(dev)
    tr = LMTask(model, tok, data, tc.train, DistillSpec(mode="none"), folder, desc=desc)
    res = tr.fit(resume)
    model = tr.plain_model().to(dev)  # whole on every process (it was sharded under FSDP)
    res = ddist.on_main(_finish, model, tok, res, folder)
    return model.eval(), res


def seqkd_data(recipe: LMRecipe, teacher, data: Data, folder: Path) -> Tensor:
    """Teacher continuations of training prompts, generated once (resumable in parts)."""
    d = recipe.distill
    folder.mkdir(parents=True, exist_ok=True)
    parts, per = [], 64
    gen = torch.Generator().manual_seed(recipe.seed + 12345)
    offsets = data.text.offsets(gen, d.seqkd_sequences)
    dev = next(teacher.parameters()).device
    for i in range(0, d.seqkd_sequences, per):
        f = folder / f"part-{i // per:05d}.pt"
        if f.exists():
            parts.append(torch.load(f, weights_only=True))
            continue
        b = data.text.batch_at(offsets[i : i + per])
        seq = sample_continuations(
            teacher, b.input_ids[:, : d.prompt_tokens].to(dev), d.gen_tokens,
            d.sample_temperature, seed=recipe.seed * 31 + i,
        ).cpu()  # fmt: skip
        torch.save(seq, f.with_suffix(".tmp"))
        os.replace(f.with_suffix(".tmp"), f)
        parts.append(seq)
    return torch.cat(parts)


def student_phase(
    recipe, seed, s_tok, data, teacher, folder: Path, resume: bool, seqkd=None, teacher_root=None,
    store=None, served=None,
):  # fmt: skip
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    dev = ddist.default_device()
    cfg = recipe.train.model_copy(update={"seed": seed})
    model = build_model(recipe.student.model, s_tok, seed)
    if recipe.student.lora is not None:
        model = apply_lora(model, recipe.student.lora, seed)
    model = model.to(dev)
    tr = LMTask(
        model, s_tok, data, cfg, recipe.distill, folder, teacher=teacher, seqkd=seqkd,
        desc=f"student seed {seed}", teacher_root=teacher_root, store=store, served=served,
    )  # fmt: skip
    res = tr.fit(resume)
    if served is not None:  # sequences this process had scored (since it last resumed)
        res["teacher_requests"] = served.requests
    res["trainable_params"] = M.param_count(model, trainable=True)
    res["params"] = M.param_count(model)
    res["seed"] = seed
    if teacher is not None and ddist.state().world > 1:
        # the teacher's parameter bytes each process holds (1/N each when sharded)
        res["teacher_placement"] = "shard" if teacher_root is not None else "replicate"
        res["teacher_param_bytes_per_process"] = ddist.all_gather_object(
            ddist.local_param_bytes(teacher)
        )
    if tr.fsdp:  # the student's too (1/N each)
        res["student_param_bytes_per_process"] = ddist.all_gather_object(
            ddist.local_param_bytes(model)
        )
    return ddist.on_main(_finish, tr.plain_model(), s_tok, res, folder, recipe)


def check_processes(recipe: LMRecipe) -> None:
    """What a multi-process run needs, checked before anything is written."""
    st = ddist.state()
    if st.fsdp and recipe.student.lora is not None:
        raise DKError(
            "causal_lm: a LoRA student is trained with DDP (its trainable weights are "
            "small); launch without --use_fsdp, and shard the teacher with "
            "teacher.placement: shard"
        )
    if st.world == 1:
        return
    trains = [("train", recipe.train)]
    trains += [(f"teacher.{w}train", m.train) for w, m in recipe._member_names()]
    for name, tr in trains:
        if tr is not None and tr.batch_size < st.world:
            raise DKError(
                f"{name}.batch_size ({tr.batch_size}) is smaller than the number of "
                f"processes ({st.world}): every process needs rows of each micro-batch"
            )


def run_lm_recipe(
    recipe: LMRecipe,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    seeds: list[int] | None = None,
) -> str:
    out = Path(out).resolve()
    ddist.on_main(check_processes, recipe)
    ddist.on_main(prepare_run_dir, out, dump_recipe(recipe), "causal_lm", resume, force)
    s_tok, t_tok, text = load_tokenizers(recipe)
    data = Data(recipe, s_tok, t_tok, text)
    dev = ddist.default_device()
    # ---- pre-flight, before any training (a teacher trained here: its architecture)
    teacher, t_info, probe_t = None, {}, None
    store = open_token_store(recipe, data, s_tok) if _is_store(recipe) else None
    served = None
    if getattr(recipe.teacher, "kind", None) == "api":
        served = recipe.teacher.scorer(s_tok)
        served.as_ids = ddist.on_main(served.probe)  # (every process asks alike)
        t_info = {"api": served.urls, "model": served.model, "top_logprobs": served.k}
    if _model_teacher(recipe) is not None:
        members = recipe.teacher_members()
        if all(m.train is None for m in members):
            teacher, t_info = teacher_phase(recipe, t_tok, data, out, resume)
            probe_t = teacher if len(members) == 1 else teacher.members[0]
        else:
            probe_t = build_model(members[0].model, t_tok, 0)
    probe_s = build_model(recipe.student.model, s_tok, 0)
    info = ddist.on_main(
        _preflight,
        out,
        probe_t,
        t_tok,
        probe_s,
        s_tok,
        max_length=data.max_length,
        batch=recipe.train.batch_size,
        chunk=recipe.distill.chunk,
        chat=data.chat,
        bytes_per=2 if recipe.train.dtype == "bf16" else 4,
    )
    del probe_s, probe_t
    if _model_teacher(recipe) is not None and teacher is None:
        teacher, t_info = teacher_phase(recipe, t_tok, data, out, resume)
    if store is not None:
        t_info = {"store": str(recipe.teacher.path), "signal": store.store.signal}
        if data.chat:  # the share of response tokens with a stored teacher signal
            t_info["coverage"] = round(data.store_coverage, 4)
    report: dict = {"name": recipe.name, "mode": recipe.distill.mode, "preflight": info}
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_info = dict(t_info)
        if "val_loss" not in t_info:
            t_info["val_loss"] = val_loss(teacher, data, teacher=True)
        report["teacher"] = t_info
    elif store is not None or served is not None:
        report["teacher"] = t_info
    use_teacher = teacher if recipe.distill.mode in ("token", "gkd") else None
    root = None
    placement = getattr(recipe.teacher, "placement", "replicate")
    if use_teacher is not None and placement == "shard" and ddist.state().world > 1:
        # each process keeps 1/N of the teacher; fully_shard moves the shards to its device
        root = ddist.shard_for_inference(HiddenStates(teacher), ddist.blocks_of(teacher))
        report["teacher"]["placement"] = "shard"
    elif teacher is not None:
        teacher.to(dev)
    seqkd = None
    if recipe.distill.mode == "seqkd":  # generated once, by process 0
        seqkd = ddist.on_main(seqkd_data, recipe, teacher, data, out / "seqkd")
    seed_list = seeds if seeds is not None else [recipe.seed]
    students = {}
    for s in seed_list:
        folder = out / "student" if seeds is None else out / f"seed_{s}" / "student"
        students[str(s)] = student_phase(
            recipe, s, s_tok, data, use_teacher, folder, resume, seqkd, root, store, served
        )
    report["students"] = students
    vals = [r["val_loss"] for r in students.values()]
    report["student_val_loss"] = {
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }
    if recipe.eval.sampled is not None:  # dk eval of the students, into the report
        report["eval"] = ddist.on_main(_sampled_eval, recipe.eval.sampled, out)
    report["rows"] = _rows_of(report)
    ddist.on_main(write_report, report, out)
    return format_report(report, out)


def _rows_of(report: dict) -> dict:
    """The report's rows, one per model (the shape every family's report.json has):
    validation loss, sizes and, with eval.sampled, the sampled-answer metrics."""
    rows = {}
    t = report.get("teacher", {})
    if "val_loss" in t:
        rows["teacher"] = {"val_loss": t["val_loss"]}
    sampled = report.get("eval", {}).get("models", {})
    for s, r in report["students"].items():
        row = {k: r[k] for k in ("val_loss", "params", "trainable_params", "steps") if k in r}
        ev = sampled.get(f"seed_{s}") or (
            sampled.get("student") if len(report["students"]) == 1 else None
        )
        if ev:
            row |= {k: ev[k] for k in ("pass@1", "maj@k", "greedy", "loss")}
        rows[f"student seed {s}"] = row
    return rows


def write_report(report: dict, out: Path) -> Path:
    """report.json, report.md (the table ``dk run`` prints) and the training curves."""
    from ..report import training_curves

    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    series = {"teacher": out / "teacher" / "metrics.jsonl"}
    for f in sorted(out.glob("teacher/member_*/metrics.jsonl")):
        series[f"teacher {f.parent.name}"] = f
    for s in report["students"]:
        folder = out / "student" if (out / "student").is_dir() else out / f"seed_{s}" / "student"
        series[f"student seed {s}"] = folder / "metrics.jsonl"
    curves = training_curves(out, series)
    md = [f"# Report: {report['name']}", "", "```", format_report(report, out), "```", ""]
    if curves is not None:
        md += [f"![{curves.stem}]({curves.name})", ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


def _sampled_eval(ev, out: Path) -> dict:
    from ..blackbox.evaluate import eval_models

    return eval_models(
        out, ev.data, verifier=ev.verifier, verifier_params=ev.verifier_params, k=ev.k,
        temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, prompt_key=ev.prompt_key,
        answer_key=ev.answer_key, template=ev.template, limit=ev.limit, seed=ev.seed,
    )  # fmt: skip


# ---------------------------------------------------------------- stores


def _is_store(recipe: LMRecipe) -> bool:
    return recipe.teacher is not None and getattr(recipe.teacher, "kind", "model") == "store"


def _store_preprocessing(recipe: LMRecipe) -> dict:
    """What turned the text into the labelled blocks (enters the store's fingerprint)."""
    d = recipe.data.model_dump(mode="json", exclude={"path", "val_blocks"})
    return {"data": d, "inputs": "token blocks of the training part", "family": "causal_lm"}


def _token_blocks(data: Data) -> tuple[Tensor, Tensor, Tensor]:
    """Every fixed training block: input ids ``(N, T)``, example ids ``(N,)``, mask."""
    ids = torch.arange(data.text.n_blocks)
    x = data.text.block_batch(ids).input_ids
    return x, ids, torch.ones_like(x, dtype=torch.bool)


def open_token_store(recipe: LMRecipe, data: Data, tok):
    """The recipe's store, checked against the run: the same token blocks (ids and
    digests), the same tokenizer, the same preprocessing; the vocabulary the student's."""
    from ..losses.sampled import check_sampled_divergence
    from ..store.fingerprint import json_digest, tensor_digest
    from ..teachers import StoreTeacher

    tc = recipe.teacher
    if data.chat:
        return _open_response_store(recipe, data, tok)
    x, ids, _ = _token_blocks(data)
    expect = {
        "data": tensor_digest(x),
        "example_ids": tensor_digest(ids),
        "preprocessing": json_digest(_store_preprocessing(recipe)),
        "tokenizer": json_digest(tok.get_vocab()),
        **tc.expect,
    }
    teacher = StoreTeacher(tc.path)
    teacher.store.check(expect, f"teacher.path {tc.path}")
    st = teacher.store
    if st.task != "sequence" or st.vocab != len(tok):
        raise DKError(
            f"teacher.path {tc.path}: the store holds {st.vocab}-way {st.task} signals but "
            f"the student's tokenizer has {len(tok)} tokens"
        )
    if st.signal == "sampled":
        check_sampled_divergence(
            recipe.distill.loss.kind,
            f"teacher.path {tc.path} (a sampled store): distill.loss.kind",
        )
    if st.signal in ("topk", "sampled"):
        t = recipe.distill.loss.temperature
        if abs(t - st.temperature) > 1e-9:
            raise DKError(
                f"teacher.path {tc.path}: fingerprint field 'temperature' differs: the "
                f"{st.signal} store was labelled at {st.temperature:g}, "
                f"distill.loss.temperature is {t:g}"
            )
    return teacher


@dataclasses.dataclass
class ResponseJoin:
    """Chat rows joined by (prompt id, sample) key to a store of sampled responses."""

    rows: list[int]  # the store example id of each training row (up to a missing key)
    lens: list[int]  # each row's leading response tokens that agree with the sampled ones
    covered: int  # Σ lens
    total: int  # Σ response tokens
    missing: tuple[int, tuple[str, int]] | None = None  # (row index, key) not in the store
    # the first disagreement: (row index, key, response position, row's token, store's)
    first: tuple[int, tuple[str, int], int, int, int] | None = None


def join_responses(st, keys: list[tuple[str, int]], examples) -> ResponseJoin:
    """Each chat row's store example (by key) and how many of its response tokens (this
    tokenizer, this chat template) agree with the sampled tokens the store keeps. Stops
    at the first key the store lacks (``missing``). Shared by the run and `dk store check`."""
    by_key = dict(zip(st.keys, st.input_ids.tolist(), strict=True))
    for i, key in enumerate(keys):
        if key not in by_key:
            return ResponseJoin([], [], 0, 0, missing=(i, key))
    rows = [by_key[k] for k in keys]
    at = {int(e): r for r, e in enumerate(st.input_ids.tolist())}  # example id → inputs row
    n_stored = st.lengths(torch.tensor(rows)).tolist()
    j = ResponseJoin(rows, [], 0, 0)
    for i, ex in enumerate(examples):
        resp = list(ex.ids[ex.n_prompt :])
        sampled = st.inputs[at[rows[i]], : n_stored[i]].tolist()
        n = 0
        for a, b in zip(resp, sampled, strict=False):
            if a != b:
                if j.first is None:
                    j.first = (i, keys[i], n, a, b)
                break
            n += 1
        j.lens.append(n)
        j.covered, j.total = j.covered + n, j.total + len(resp)
    return j


def _open_response_store(recipe: LMRecipe, data: Data, tok):
    """A store of sampled responses (``dk store from-api``) joined to the chat rows.

    Each training row's (prompt id, sample) key names its store example; the row's
    response tokens (this tokenizer, this chat template) are compared with the sampled
    ones the store keeps, and KD covers the leading positions where they agree (the
    teacher's distribution there was conditioned on the same text); the rest of a row
    (a chat template's end-of-turn tokens, a re-tokenised tail) trains with CE only."""
    from ..store.fingerprint import json_digest
    from ..teachers import StoreTeacher

    tc = recipe.teacher
    where = f"teacher.path {tc.path}"
    teacher = StoreTeacher(tc.path)
    st = teacher.store
    st.check({"tokenizer": json_digest(tok.get_vocab()), **tc.expect}, where)
    if st.keys is None or st.inputs is None:
        raise DKError(
            f"{where}: the store has no (prompt id, sample) keys, so chat rows cannot be "
            "joined to it: on chat data use a store from `dk store from-api` (a `dk label` "
            "store serves text data with data.sampling: blocks)"
        )
    if st.signal != "topk" or st.vocab != len(tok):
        raise DKError(
            f"{where}: the store holds {st.vocab}-way {st.signal} signals but the "
            f"student's tokenizer has {len(tok)} tokens"
        )
    t = recipe.distill.loss.temperature
    if abs(t - st.temperature) > 1e-9:
        raise DKError(
            f"{where}: fingerprint field 'temperature' differs: the store holds log-probs "
            f"at {st.temperature:g}, distill.loss.temperature is {t:g}"
        )
    j = join_responses(st, data.train_keys, data.train.student)
    if j.missing is not None:
        i, key = j.missing
        raise DKError(
            f"{recipe.data.train}: training row {i + 1} (id {key[0]!r}, sample {key[1]}) is "
            f"not in the store {tc.path}; convert the same `dk generate` results it came from"
        )
    if j.covered == 0:
        raise DKError(
            f"{where}: no response token of the chat rows agrees with the sampled tokens the "
            "store holds; the store is for other text or another tokenizer"
        )
    data.store_rows = torch.tensor(j.rows, dtype=torch.long)
    data.store_len = torch.tensor(j.lens, dtype=torch.long)
    data.store_coverage = j.covered / max(j.total, 1)
    return teacher


class _Logits(torch.nn.Module):
    """A causal LM as the labeller sees it: token ids ``(B, T)`` → logits ``(B, T, V)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x, attention_mask=torch.ones_like(x)).logits

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def label_lm_recipe(recipe: LMRecipe, out: str | Path, force: bool = False):
    """`dk label` on a causal_lm recipe: its teacher (trained first into ``out/teacher``
    when the recipe says so) over every fixed training block of its text, into a token
    store at ``out`` (rerun to resume)."""
    from ..config import LabelConfig
    from ..store import LabelSpec, label
    from ..store.fingerprint import json_digest
    from ..store.label import default_k
    from ..teachers import ModuleTeacher

    if _model_teacher(recipe) is None:
        raise DKError("dk label needs a teacher model: a 'teacher:' section with model:")
    if not isinstance(recipe.data, TextData):
        raise DKError("dk label on causal_lm recipes takes text data (data.kind: text) for now")
    out = Path(out)
    s_tok, t_tok, text = load_tokenizers(recipe)
    if json_digest(s_tok.get_vocab()) != json_digest(t_tok.get_vocab()):
        raise DKError("dk label: a token store needs one tokenizer for teacher and student")
    data = Data(recipe, s_tok, t_tok, text)
    # the folder's store and trained teacher are reused only for this recipe's teacher/data
    dumped = recipe.model_dump(mode="json")
    record = {
        "teacher": dumped["teacher"],
        "data": dumped["data"],
        "tokenizer": dumped["tokenizer"],
    }
    trains = any(m.train is not None for m in recipe.teacher_members())
    ddist.on_main(prepare_label_folder, out, record, force, trains)
    teacher, _ = teacher_phase(recipe, t_tok, data, out, resume=True)
    teacher = teacher.to("cpu").eval()
    lc = recipe.label or LabelConfig()
    spec = LabelSpec(
        signal=lc.signal, k=lc.k or default_k(lc.signal), dtype=lc.dtype,
        temperature=lc.temperature, shard_size=lc.shard_size, batch_size=min(lc.batch_size, 64),
        tail_prior=lc.tail_prior, head_layer=lc.head_layer, seed=lc.seed,
    )  # fmt: skip
    x, ids, mask = _token_blocks(data)
    return label(
        ModuleTeacher(_Logits(teacher)),
        x,
        ids,
        out,
        spec,
        mask=mask,
        preprocessing=_store_preprocessing(recipe),
        tokenizer=json_digest(t_tok.get_vocab()),
        describe={"recipe": recipe.name, "data": str(recipe.data.path), "teacher": "causal_lm"},
        force=force,
        recipe=record,
        store_inputs=True,  # the token ids per position, once (inputs.safetensors)
    )


def _preflight(out: Path, *args, **kwargs) -> dict:
    info = preflight(*args, **kwargs)
    (out / "preflight.json").write_text(json.dumps(info, indent=2))
    return info


def format_report(report: dict, out: Path) -> str:
    lines = [f"{report['name']} ({report['mode']}): {out}"]
    if "val_loss" in report.get("teacher", {}):
        lines.append(f"  teacher val loss  {report['teacher']['val_loss']:.4f}")
    elif "store" in report.get("teacher", {}):
        t = report["teacher"]
        lines.append(f"  teacher           a {t['signal']} store: {t['store']}")
    for s, r in report["students"].items():
        lines.append(
            f"  student seed {s:>3}  val loss {r['val_loss']:.4f}  "
            f"({r['steps']} steps, {r['wall_s']:.0f} s)  → {r['model']}"
        )
    sv = report["student_val_loss"]
    if sv["n"] > 1:
        lines.append(f"  student mean {sv['mean']:.4f} ± {sv['sd']:.4f} (sd, n={sv['n']})")
    if "eval" in report:
        from ..blackbox.evaluate import format_eval

        lines += ["", *format_eval(report["eval"]).splitlines()]
    return "\n".join(lines)
