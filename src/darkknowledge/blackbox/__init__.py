"""Black-box distillation: a teacher behind an OpenAI-compatible API.

- :mod:`.client`: bounded-concurrency client with retries, endpoint rotation, cache, budget
- :mod:`.generate`: ``dk generate`` (sample → verify → SFT rows), resumable
- :mod:`.verifiers`: answer checkers by registry name (``gsm8k``, ``exact``, ``regex``)
- :mod:`.serve`: ``dk serve-teacher`` (a local causal LM as an OpenAI-compatible server)
- :mod:`.sft`: student fine-tuning on the SFT rows (loss on the response) and pass@1/maj@k
"""
