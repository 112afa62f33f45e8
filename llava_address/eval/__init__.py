"""Stage 5, evaluation: the gazetteer, the scorer, batch inference (transformers or vLLM) and the benchmark
against other multimodal models. Imports the training floor below it, never the apps above."""
