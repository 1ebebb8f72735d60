"""Data for moekit models: text corpora and tokenizers (`text`), time series (`timeseries`).

This package file holds no code; import the submodules directly so that, for
example, training a forecaster never loads the tokenizer library.
"""
