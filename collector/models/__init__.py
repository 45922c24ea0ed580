"""Models for the ``infer`` transform: the built-in detector, feature frames and model loaders.

Split by job so the built-in detector and feature code import on a bare install, while the
loaders pull in scikit-learn/joblib/onnxruntime only when a config names such a model.
"""
