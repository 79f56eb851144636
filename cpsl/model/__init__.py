from .cpsl import CPSLModel, ExportWrapper, ModelOutput
from .linear import LinearFusionNet

__all__ = ["CPSLModel", "ExportWrapper", "LinearFusionNet", "ModelOutput", "build"]


def build(dims: dict, cfg):
    """The model of ``cfg`` (a :class:`cpsl.config.ModelConfig`): ``arch`` cpsl or linear."""
    return LinearFusionNet(dims, cfg) if cfg.arch == "linear" else CPSLModel(dims, cfg)
