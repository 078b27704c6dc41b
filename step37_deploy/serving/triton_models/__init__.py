"""The ``model.py`` files a step37 Triton model repository ships (copied to ``<model>/1/model.py``).

``tower.py`` runs the ONNX Runtime or torch runner for one resolution; ``embedder.py`` decodes an
image, sends its views to the towers through Triton (BLS) and applies the projector.  Both import
``step37_deploy`` and call its preprocessing, runner and fusion code; they re-implement nothing.
They run inside Triton's Python-backend stub, which provides ``triton_python_backend_utils``.
"""
