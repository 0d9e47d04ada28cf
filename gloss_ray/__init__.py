"""gloss-ray: fine-tune text encoders with G-Loss on Ray Train.

The maths (``gloss_ray.losses``) is plain PyTorch and has no Ray dependency.
"""

__version__ = "0.1.0"
