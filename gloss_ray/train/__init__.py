"""Fine-tuning: the per-worker loop (``loop``) and its Ray Train launcher (``launch.fit``)."""
