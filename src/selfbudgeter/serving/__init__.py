"""Serving a budgeted model: generator (budget-first generation, the transformers backend), vllm_generator
(the vLLM backend), server (`selfbudgeter serve`, OpenAI-compatible, with web/index.html) and chat."""
