"""The model's life on a site: where weights live, how a training run becomes a version,
when a version serves, and when training starts on its own.

``model_store`` (paths, version ids, recorded plans), ``versions`` (versions, promotion and
rollback: the one home of both), ``splits`` (the persisted train/validation/test split),
``autotrain`` (retraining when enough new labels arrived).
"""
