"""Serving the embedder on Triton Inference Server.

``contract`` is the served API (model, tensor names, dtypes, dims) that everything else imports;
``repository`` writes a Triton model repository from artifacts, ``triton_models`` holds the
``model.py`` files it ships, ``server`` launches ``tritonserver`` on it, ``client`` and
``loadtest`` talk to it.
"""
