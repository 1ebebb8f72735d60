"""moefy: dense models into Mixture-of-Experts (sparse upcycling, MoEfication, Read-ME).

`convert(model, method=..., experts=E, top_k=K, shared_fraction=F, calib=...)`
turns a dense moekit DecoderLM (or a converted encoder host) into an MoE;
`load(DIR)` / `save(model, DIR)` read and write converted models and read the
dense originals (moekit checkpoints, Hugging Face Llama / Mistral / Qwen2
decoders, BERT-family sentence encoders). Training of routers (distillation,
expert tuning) lives in `moekit.moefy.tune`, which is not imported here.
"""

from .spec import METHODS, MoefyError, MoefySpec


def convert(model, method: str = "upcycle", experts: int = 8, top_k: int = 2, shared_fraction: float = 0.0,
            calib=None, router: str = "per-layer", seed: int = 0):
    """A converted copy of a dense model; see the package docstring and spec.MoefySpec."""
    spec = MoefySpec(method, experts, top_k, shared_fraction, router, seed).check()
    if hasattr(model, "convert_to_moe"):  # encoders carry their own conversion
        return model.convert_to_moe(spec, calib)
    from ..models.decoder import DecoderLM
    from .decoder import convert_decoder

    if not isinstance(model, DecoderLM):
        raise MoefyError(f"{type(model).__name__} is not a model moefy converts: accepted are moekit DecoderLM "
                         "(also loaded from Hugging Face Llama / Mistral / Qwen2) and BERT-family encoders")
    return convert_decoder(model, spec, calib)


__all__ = ["METHODS", "MoefyError", "MoefySpec", "convert", "load", "save"]


def load(path):
    """The model in DIR (converted by moefy, or a dense original); see io.load."""
    from .io import load as _load

    return _load(path)


def save(model, out, source=None):
    """Write a converted model to OUT; see io.save."""
    from .io import save as _save

    return _save(model, out, source)
