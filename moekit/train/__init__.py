"""Training: the generic loop, and the recipes built on it (language models, pre-gate heads, forecasters).

Models never import this package: a model is built from its config in moekit.models.
"""
