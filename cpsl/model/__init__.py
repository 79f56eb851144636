from .cpsl import CPSLModel, ExportWrapper, ModelOutput

__all__ = ["CPSLModel", "ExportWrapper", "ModelOutput"]
