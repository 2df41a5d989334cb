"""The method's training stages, in pipeline order: profile (stage 0), sft_data and sft (the cold start,
stage 1), rewards, relabel and grpo (stage 2). Their packaged settings are `selfbudgeter/recipes/`."""
