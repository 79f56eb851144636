"""cpsl: balanced multimodal sentiment analysis (text, audio, vision), from training to the edge.

The Python API mirrors the ``cpsl`` command line (docs/api.md):

    configure(preset, file, sets, **keys) -> Config   the run configuration (cpsl config show)
    toy_text(out) -> Path                              cpsl data toy-text (a built-in toy text set)
    fit(cfg, data, out) -> Run                         cpsl train
    load(ckpt) -> Model                                a best.pt; Model.predict(texts), Model.evaluate(data)
    evaluate(ckpt, data, split) -> dict                cpsl eval
    export(ckpt, out, precision, data) -> Manifest     cpsl export --out
    predict(model, texts) -> array                     cpsl predict (checkpoint or exported artefact)

``CPSLError`` is raised on bad input. ``import cpsl`` stays light: torch is imported when a
function needs it. The torch-free device runner is :mod:`cpsl.edge` (console script ``cpsl-runner``).
"""
__version__ = "0.2.0"

__all__ = ["__version__", "CPSLError", "Model", "Run", "configure", "evaluate", "export", "fit", "load", "predict",
           "toy_text"]


def __getattr__(name: str):
    """The API names resolve on first use (PEP 562), so the package's own modules, which import
    ``cpsl`` (e.g. for the extension cpsl._C), do not pull in the API layer."""
    if name == "CPSLError":
        from .errors import CPSLError
        return CPSLError
    if name in __all__:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.api"), name)   # not a static import: see above
    raise AttributeError(f"module 'cpsl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
