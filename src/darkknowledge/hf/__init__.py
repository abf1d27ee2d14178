"""The Hugging Face transformers adapter, shared by every transformer route.

- :mod:`.io`: loading models and tokenizers (local folder or hub id), tiny models built
  from configs by registry name, ``save_pretrained`` export. Everything that touches
  ``transformers`` loading goes through here.
- Encoder compression and text classification (DistilBERT route): ``layers``,
  ``text_recipe``, ``text_pipeline`` and friends in this package.
- Causal LMs (token-level KD, GKD): :mod:`darkknowledge.lm`, which uses this package.

``transformers`` is an optional extra: ``pip install 'darkknowledge[hf]'``.
"""
