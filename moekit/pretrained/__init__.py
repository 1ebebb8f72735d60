"""Weights that ship with moekit: `timemoe/`, the default forecaster in Time-MoE's Hugging Face layout.

Holds data only (config.json, model.safetensors, quantiles.json, and a card
saying how they were made: `moekit pretrain-forecaster`); loading is
`moekit.hf.timemoe.load_forecaster(None)`. No code here.
"""
