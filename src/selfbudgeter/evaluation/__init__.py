"""Measuring a model: generation (the seeded batched sampler of profile and eval), evaluate (`selfbudgeter
eval`) and report (`selfbudgeter report`: tables and plots across runs)."""
