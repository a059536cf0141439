"""Measuring the models: perplexity protocols (scoring), paired intervals (stats), generation, answers
and benchmarks."""
