"""The Hugging Face transformers adapter, shared by every transformer route.

- :mod:`.io`: loading models and tokenizers (local folder or hub id), tiny models built
  from configs by registry name, ``save_pretrained`` export. Everything that touches
  ``transformers`` loading goes through here.
- Encoder compression and text classification (DistilBERT route): :mod:`.layers`
  (students from a teacher's layers), :mod:`.distil_losses` (soft targets, MLM, cosine
  with projection, attention transfer, the task-agnostic triple loss), :mod:`.text_data`
  (TSV / CSV / JSONL / Parquet / ``datasets``), :mod:`.text_recipe` + :mod:`.text_pipeline`
  (``family: text`` for ``dk run``).
- Causal LMs (token-level KD, GKD): :mod:`darkknowledge.lm`, which uses this package.

``transformers`` is an optional extra: ``pip install 'darkknowledge[hf]'``.
"""
