"""The torch-free device runner (``cpsl-runner``; ``python -m cpsl.edge.runner``): golden checks,
benchmarks and ``predict`` from raw text for an exported artefact, on ONNX Runtime or TensorRT.

The three modules import neither torch nor the rest of cpsl, so they also work as plain files
copied beside the artefacts onto a device (``python3 runner.py ...``; ``predict`` needs
``predict.py`` and ``frontend.py`` beside ``runner.py``). In a clone they are also reachable as
``export/runner.py``, ``export/predict.py`` and ``export/frontend.py``.
"""
