"""The MoE path, nothing model-specific: routing, dispatch, experts, layers, statistics.

Data flow of one MoE layer: router(x_TD) -> Routing -> dispatcher (capacity,
token layout) -> experts(x_SD, rows_E) -> dispatcher.combine. Models build on
this package; it imports nothing above it (no models, training or inference).
"""
