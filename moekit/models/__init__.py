"""Models built from dataclass configs: the decoder LM and the Time-MoE forecaster.

Nothing here trains or generates: training lives in moekit.train, generation in
moekit.infer. Models use moekit.moe for every MoE layer.
"""
